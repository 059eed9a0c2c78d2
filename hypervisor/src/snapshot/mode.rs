//! Which way a snapshot copies memory, and how the mode asked for becomes the mode that runs.
//!
//! | mode | guest pause | use it when |
//! |---|---|---|
//! | `background` (default) | vCPU and device state plus write-protecting RAM | the VM runs on after the snapshot: the shortest pause, whatever the guest writes |
//! | `stop` | all of the copy and the commit | the VM stops or stays paused afterwards anyway, or memory is still served by a lazy restore that does not fill it in the background |
//! | `live` | the last dirty round and the commit | the host cannot write-protect (userfaultfd without write protection); a guest that writes little |
//!
//! Background falls back to stop-and-copy, and says why in the report and the log, when it
//! cannot help or cannot work: the VM is paused or stays paused, or its memory is registered
//! with a lazy restore's page server that is still filling it (a range can belong to one
//! userfaultfd only; once the VM is fully resident the server unregisters its ranges at the
//! next snapshot, [`migrate::lazy::PageServer::release_ranges`]), or write protection fails to
//! start.
//!
//! A VM still being filled by its lazy restore's background fill first gets the time to
//! finish ([`wait_for_fill`]): the guest runs meanwhile, and the snapshot then runs in the
//! background with its short pause, where falling back would pause the guest for the copy of
//! all its memory. The wait is bounded ([`super::SaveOptions::fill_wait`]); it ends early if
//! the snapshot is cancelled, the VM stops or the caller ends it
//! ([`super::SaveOptions::end_fill_wait`]: the daemon stopping, or a client's pause, resume
//! or stop of the VM queued behind the snapshot), and a server that fills nothing by itself
//! (no background fill) is not waited for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vm::Vm;

/// How a snapshot copies memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaveMode {
    /// Pause to save vCPU and device state and write-protect RAM; copy RAM while the guest
    /// runs (userfaultfd write protection: a first write copies its chunk first).
    #[default]
    Background,
    /// Stop-and-copy: the guest is paused for the whole copy and the commit.
    Stop,
    /// Dirty-log pre-copy: copy while the guest runs, then pause for what it dirtied.
    Live,
}

impl SaveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SaveMode::Background => "background",
            SaveMode::Stop => "stop",
            SaveMode::Live => "live",
        }
    }
}

/// A hook called with the VM.
pub type VmHook = Arc<dyn Fn(&Vm) + Send + Sync>;

/// Test hooks of a snapshot (`Default`: none).
#[derive(Clone, Default)]
pub struct SaveHooks {
    /// Background: called with the VM still paused, right after its RAM is write-protected and
    /// its state captured: memory now is exactly what the snapshot will hold.
    pub after_protect: Option<VmHook>,
    /// Background: a fault thread that unprotects without copying first (a broken protection,
    /// for tests to show they catch it). Never set it outside tests.
    pub broken_protection: bool,
    /// Background: called with the VM running and RAM pre-protected, after the re-protection
    /// rounds, right before the pause.
    pub during_pre_protect: Option<VmHook>,
    /// Background: a failure (or a bug) to inject into pre-protection. Never set it outside
    /// tests.
    pub pre_protect_fault: Option<PreProtectFault>,
    /// Background: the saver starts copying only once the guest has written a protected chunk
    /// (or after 10 s), so a test knows the copy-before-write path ran whatever the host's
    /// load. Never set it outside tests.
    pub copy_after_first_fault: bool,
    /// Background: the saver waits before copying, the guest running, until the snapshot is
    /// cancelled (or 60 s pass), so a test can act on a snapshot that is surely still running.
    /// Never set it outside tests.
    pub hold_copy: bool,
}

/// Failures and bugs tests inject into a background snapshot's pre-protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreProtectFault {
    /// A re-protection round fails while the guest runs.
    Round,
    /// The write-fault thread fails at its first fault in the track phase.
    FaultThread,
    /// Arming fails with the VM paused, after it protected what it had to.
    Arm,
    /// A bug, not a failure: arming leaves the chunks written since the last round writable.
    ArmSkipsRedirtied,
}

impl SaveHooks {
    pub const NONE: SaveHooks = SaveHooks {
        after_protect: None,
        broken_protection: false,
        during_pre_protect: None,
        pre_protect_fault: None,
        copy_after_first_fault: false,
        hold_copy: false,
    };
}

impl std::fmt::Debug for SaveHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveHooks")
            .field("after_protect", &self.after_protect.is_some())
            .field("broken_protection", &self.broken_protection)
            .field("during_pre_protect", &self.during_pre_protect.is_some())
            .field("pre_protect_fault", &self.pre_protect_fault)
            .field("copy_after_first_fault", &self.copy_after_first_fault)
            .field("hold_copy", &self.hold_copy)
            .finish()
    }
}

/// The mode that runs for `asked` (with the old `live` flag), and why it differs if it does.
pub(super) fn resolve(
    vm: &Vm,
    asked: SaveMode,
    live_flag: bool,
    running: bool,
    stay_paused: bool,
) -> (SaveMode, Option<String>) {
    let asked = if live_flag { SaveMode::Live } else { asked };
    match asked {
        SaveMode::Stop => (SaveMode::Stop, None),
        SaveMode::Live if running => (SaveMode::Live, None),
        SaveMode::Live => (SaveMode::Stop, Some("live asked, but the VM is paused: stop-and-copy".into())),
        SaveMode::Background if !running => {
            (SaveMode::Stop, Some("the VM is paused: nothing runs beside the copy, so stop-and-copy".into()))
        }
        SaveMode::Background => match vm.page_server().map(|s| s.release_ranges()) {
            // Resident: the server gave its ranges up, so write protection can take them.
            Some(Ok(true)) | None if stay_paused => {
                (SaveMode::Stop, Some("the VM stays paused after the snapshot, so stop-and-copy".into()))
            }
            Some(Ok(true)) | None => (SaveMode::Background, None),
            Some(Ok(false)) => (
                SaveMode::Stop,
                Some(
                    "the VM's memory is still registered with its lazy restore's page server (not yet \
                     resident), which a write-protecting userfaultfd cannot share: stop-and-copy"
                        .into(),
                ),
            ),
            Some(Err(e)) => (SaveMode::Stop, Some(format!("{e}: stop-and-copy"))),
        },
    }
}

/// A background snapshot's wait for a lazy restore's fill to finish, the guest running.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct FillWait {
    /// Chunks not yet resident when the wait began.
    pub chunks: u64,
    /// How long it waited.
    pub ms: f64,
    /// The VM became resident (otherwise the wait ended at its bound, a cancel, the VM's
    /// stop or the server's failure, and the snapshot falls back to stop-and-copy).
    pub resident: bool,
}

/// Waits, up to `limit` and with the guest running, for a lazily restored VM to become
/// resident when a background snapshot is asked for (see the module doc); `None` when there
/// is nothing to wait for or waiting cannot help.
pub(super) fn wait_for_fill(
    vm: &Vm,
    asked: SaveMode,
    live_flag: bool,
    running: bool,
    stay_paused: bool,
    limit: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Option<FillWait> {
    if live_flag || asked != SaveMode::Background || !running || stay_paused || limit.is_zero() {
        return None;
    }
    let server = vm.page_server()?;
    if server.is_resident() || !server.fills_in_background() || server.error().is_some() {
        return None;
    }
    let (t0, chunks) = (Instant::now(), server.chunks_left());
    tracing::info!(
        chunks_left = chunks,
        "background snapshot: waiting for the lazy restore to fill the rest of memory"
    );
    let resident = server.wait_resident_while(limit, &|| !cancelled() && vm.control().exit_reason().is_none());
    Some(FillWait { chunks, ms: t0.elapsed().as_secs_f64() * 1e3, resident })
}

/// Whether a wait for a lazy fill should end now ([`SaveOptions::end_fill_wait`]); asked
/// every few milliseconds while the snapshot waits.
#[derive(Clone)]
pub struct EndFillWait(Arc<dyn Fn() -> bool + Send + Sync>);

impl EndFillWait {
    /// Ends the wait once `ended` returns true.
    pub fn new(ended: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        EndFillWait(Arc::new(ended))
    }

    /// Ends the wait once `flag` is set.
    pub fn when_set(flag: Arc<AtomicBool>) -> Self {
        EndFillWait::new(move || flag.load(Ordering::Acquire))
    }

    pub fn ended(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for EndFillWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndFillWait(..)")
    }
}
