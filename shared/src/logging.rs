//! Structured JSON logs for Lambda and CLI alike (`RUST_LOG` filters, default `info`).
//!
//! One line per event, its fields flattened beside `message` (the event text). A field may
//! therefore never be called `message` itself: the line would carry two `message` keys, which
//! CloudWatch Logs Insights and most JSON readers resolve by dropping one. Name it for what it
//! is (`braze_message`, `reason`, `error`).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// The production JSON subscriber writing to `writer` (tests capture lines with it).
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .without_time()
        .with_env_filter(filter)
        .with_writer(writer)
        .finish()
}

/// Installs the JSON log subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = json_subscriber(filter, std::io::stderr).try_init();
}

#[cfg(any(test, feature = "test-util"))]
/// The keys of a JSON object line that occur more than once (at the top level or nested),
/// for tests that hold log lines to one key each. `Err` when the line is not JSON.
pub fn repeated_keys(line: &str) -> Result<Vec<String>, serde_json::Error> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(KeysVisitor)
        }
    }
    struct KeysVisitor;
    impl<'de> serde::de::Visitor<'de> for KeysVisitor {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut seen = std::collections::BTreeSet::new();
            let mut repeated = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                let Keys(inner) = map.next_value::<Keys>()?;
                repeated.extend(inner);
                if !seen.insert(k.clone()) {
                    repeated.push(k);
                }
            }
            Ok(Keys(repeated))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Keys, A::Error> {
            let mut repeated = Vec::new();
            while let Some(Keys(inner)) = seq.next_element::<Keys>()? {
                repeated.extend(inner);
            }
            Ok(Keys(repeated))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
        fn visit_str<E>(self, _: &str) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
        fn visit_unit<E>(self) -> Result<Keys, E> {
            Ok(Keys(Vec::new()))
        }
    }
    serde_json::from_str::<Keys>(line).map(|k| k.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_found_at_any_depth() {
        assert_eq!(
            repeated_keys(r#"{"message":"a","level":"WARN","message":"b"}"#).unwrap(),
            ["message"]
        );
        assert_eq!(
            repeated_keys(r#"{"span":{"x":1,"x":2},"l":[{"y":1,"y":1}]}"#).unwrap(),
            ["x", "y"]
        );
        assert!(
            repeated_keys(r#"{"message":"a","fields":{"message":"b"}}"#)
                .unwrap()
                .is_empty()
        );
        assert!(repeated_keys("not json").is_err());
    }

    #[test]
    fn a_field_named_message_would_repeat_the_key() {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map(|mut v| v.extend_from_slice(b)).ok();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let w = sink.clone();
        let sub = json_subscriber(EnvFilter::new("info"), move || w.clone());
        tracing::subscriber::with_default(sub, || {
            let message = "from Braze";
            tracing::warn!(message = %message, "Event text.");
            tracing::warn!(braze_message = %message, "Event text.");
        });
        let text = String::from_utf8(sink.0.lock().map(|v| v.clone()).unwrap_or_default())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(repeated_keys(lines[0]).unwrap(), ["message"], "{text}");
        assert!(repeated_keys(lines[1]).unwrap().is_empty(), "{text}");
    }
}
