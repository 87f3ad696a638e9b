//! Tracing set-up: human-readable logs locally, JSON on Lambda or when `INKWIRE_LOG_FORMAT=json`.
//! The level comes from `RUST_LOG` (default `info`). Logs go to stderr (stdout is the
//! commands' own output), with colours only when stderr is a terminal and `NO_COLOR` is not
//! set, so that files and log collectors get no escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("INKWIRE_LOG_FORMAT").as_deref() == Ok("json")
        || std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ));
    // try_init: tests and the CLI may call this more than once.
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Colours for a terminal, unless `NO_COLOR` is set to anything non-empty (no-color.org).
fn colours(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal() {
        assert!(colours(true, None));
        assert!(!colours(false, None));
        assert!(!colours(true, Some("1".into())));
        assert!(colours(true, Some("".into())));
    }
}
