//! ACPICA's `iasl` (package acpica-tools, installed by deploy/install-deps.sh) as the judge of
//! ACPI tables.

use std::path::Path;
use std::process::Command;

/// Lines of iasl's output that report a problem.
pub fn problems(output: &str) -> Vec<String> {
    let bad = ["error", "warning", "invalid", "incorrect", "does not contain", "too long"];
    output.lines().filter(|l| bad.iter().any(|b| l.to_lowercase().contains(b))).map(str::to_string).collect()
}

/// `iasl -d NAME.dat` in `dir`: its combined output and the disassembly.
pub fn iasl(dir: &Path, name: &str) -> (bool, String, String) {
    let o = Command::new("iasl")
        .arg("-d")
        .arg(format!("{name}.dat"))
        .current_dir(dir)
        .output()
        .expect("iasl (package acpica-tools, installed by deploy/install-deps.sh)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
    (o.status.success(), text, dsl)
}
