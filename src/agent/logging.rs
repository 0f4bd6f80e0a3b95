//! The agent's log subscriber: where lines go (stderr or `log.file`), at which level, and in
//! which format (`log.format`: plain text or JSON lines).
//!
//! ANSI colour is written only when the output is a terminal (and `NO_COLOR` is unset): under
//! systemd, stderr is the journal, and an operator grepping a file must not meet escape codes.

use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, warn};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::{AgentConfig, LogFormat};

/// Whether to colour stderr: only a terminal, and `NO_COLOR` (no-color.org) wins.
fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up `tracing` to stderr or to `log.file`, at `log.level` (RUST_LOG wins when set), in
/// `log.format`. Installed once per process.
pub fn init_logging(cfg: &AgentConfig) {
    let level = cfg
        .log
        .as_ref()
        .and_then(|l| l.level.clone())
        .unwrap_or_else(|| "info".into());
    let format = cfg
        .log
        .as_ref()
        .map(|l| l.effective_format())
        .unwrap_or_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let mut open_error = None;
    let (writer, ansi) = match cfg.log.as_ref().and_then(|l| l.file.clone()) {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => (BoxMakeWriter::new(std::sync::Mutex::new(f)), false),
            Err(e) => {
                open_error = Some(format!("cannot open log file {}: {e}", path.display()));
                (BoxMakeWriter::new(std::io::stderr), stderr_wants_colour())
            }
        },
        None => (BoxMakeWriter::new(std::io::stderr), stderr_wants_colour()),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Plain => layer.boxed(),
        LogFormat::Json => layer.event_format(JsonLines).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .init();
    if let Some(e) = open_error {
        warn!("{e}; logging to stderr");
    }
}

/// One JSON object per event: `time` (RFC 3339, UTC, ms), `level`, `message`, the event's
/// fields, and `spans` (outermost first) when inside any.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut obj = Map::new();
        obj.insert(
            "time".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        obj.insert("level".into(), event.metadata().level().as_str().into());
        event.record(&mut JsonFields(&mut obj));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|s| s.name().into()).collect();
            if !spans.is_empty() {
                obj.insert("spans".into(), Value::Array(spans));
            }
        }
        writeln!(writer, "{}", Value::Object(obj))
    }
}

struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_format_writes_one_object_per_line_with_message_and_fields() {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(JsonLines)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("ha-loop");
            let _g = span.enter();
            tracing::warn!(error = "no device", cycles = 3u64, "watchdog unusable");
            tracing::info!("second line");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["message"], "watchdog unusable");
        assert_eq!(lines[0]["error"], "no device");
        assert_eq!(lines[0]["cycles"], 3);
        assert_eq!(lines[0]["spans"], serde_json::json!(["ha-loop"]));
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert!(!text.contains('\u{1b}'));
    }
}
