//! Integration tests for snapvisor live in `tests/`; this library is empty.
