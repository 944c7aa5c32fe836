//! Structured logs with tracing, as text or JSON lines, always on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::runtime::cli::LogFormat;
use crate::runtime::config::ConfigError;

/// Installs the global subscriber; a bad filter is a configuration error.
pub fn init(format: LogFormat, filter: &str) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| ConfigError(format!("FLEET_LOG: {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A panic is a log line like any other (one line, in the chosen format): the pipeline catches
    // the handler's panics and carries on, so they must be visible where the rest is.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, %message, "panic");
    }));
    Ok(())
}
