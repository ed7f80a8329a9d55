//! Rendering: tables for people, and files written so that a crash never
//! leaves half of one behind.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use capsa_tee::Claims;

/// Writes to stdout. A reader that stops early (`capsa ... | head`, `grep -q`)
/// closes the pipe: that ends the output quietly instead of a panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_fmt(args) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(Into::into),
    }
}

/// `print!` that tolerates a closed pipe; evaluates to `anyhow::Result<()>`.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that tolerates a closed pipe; evaluates to `anyhow::Result<()>`.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(crate) use {out, outln};

/// Prints (name, value) rows with aligned names.
pub fn table(rows: &[(String, String)]) -> anyhow::Result<()> {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        outln!("{k:<width$}  {v}")?;
    }
    Ok(())
}

/// Prints claims as a table, one claim per line, in the order serialised.
pub fn claims_table(claims: &Claims) -> anyhow::Result<()> {
    let value = serde_json::to_value(claims)?;
    let mut rows = Vec::new();
    flatten("", &value, &mut rows);
    table(&rows)
}

fn flatten(prefix: &str, value: &serde_json::Value, rows: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, rows);
            }
        }
        serde_json::Value::String(s) => rows.push((prefix.to_owned(), s.clone())),
        other => rows.push((prefix.to_owned(), other.to_string())),
    }
}

/// Writes a file atomically: a temporary sibling, fsynced, renamed over the
/// target, and the directory fsynced so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}
