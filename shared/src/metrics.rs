//! CloudWatch Embedded Metric Format: one JSON line per run on stdout, which Lambda ships to
//! CloudWatch Logs where it becomes metrics without any API call.

use serde_json::{Map, Value, json};

/// A metric value and its unit.
#[derive(Debug, Clone, Copy)]
pub enum Metric {
    /// A plain count.
    Count(f64),
    /// A duration in seconds.
    Seconds(f64),
    /// A rate per second.
    PerSecond(f64),
}

impl Metric {
    fn unit(&self) -> &'static str {
        match self {
            Metric::Count(_) => "Count",
            Metric::Seconds(_) => "Seconds",
            Metric::PerSecond(_) => "Count/Second",
        }
    }
    fn value(&self) -> f64 {
        match self {
            Metric::Count(v) | Metric::Seconds(v) | Metric::PerSecond(v) => *v,
        }
    }
}

/// Builds one EMF document for `namespace` with the given dimensions and metrics.
pub fn emf_line(
    namespace: &str,
    dimensions: &[(&str, &str)],
    metrics: &[(&str, Metric)],
    timestamp_ms: i64,
) -> String {
    let mut root = Map::new();
    let dims: Vec<&str> = dimensions.iter().map(|(k, _)| *k).collect();
    let defs: Vec<Value> = metrics
        .iter()
        .map(|(n, m)| json!({"Name": n, "Unit": m.unit()}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({"Timestamp": timestamp_ms,
               "CloudWatchMetrics": [{"Namespace": namespace, "Dimensions": [dims], "Metrics": defs}]}),
    );
    for (k, v) in dimensions {
        root.insert((*k).into(), Value::String((*v).into()));
    }
    for (n, m) in metrics {
        root.insert((*n).into(), json!(m.value()));
    }
    Value::Object(root).to_string()
}

/// Prints an EMF document to stdout.
pub fn emit(namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, Metric)]) {
    println!(
        "{}",
        emf_line(
            namespace,
            dimensions,
            metrics,
            chrono::Utc::now().timestamp_millis()
        )
    );
}

/// One CloudWatch metric as a dashboard or an emitter names it: namespace, metric name and the
/// (sorted) names of its dimensions. Used to hold the operations dashboard to what the code emits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricKey {
    /// CloudWatch namespace.
    pub namespace: String,
    /// Metric name.
    pub name: String,
    /// Dimension names, sorted.
    pub dimensions: Vec<String>,
}

impl std::fmt::Display for MetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} [{}]",
            self.namespace,
            self.name,
            self.dimensions.join(",")
        )
    }
}

/// The metrics an EMF line declares (every namespace and dimension set it lists).
pub fn emf_metric_keys(line: &str) -> Result<Vec<MetricKey>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let directives = v["_aws"]["CloudWatchMetrics"]
        .as_array()
        .ok_or("no _aws.CloudWatchMetrics")?;
    let mut out = Vec::new();
    for d in directives {
        let namespace = d["Namespace"]
            .as_str()
            .ok_or("directive without Namespace")?;
        let dim_sets = d["Dimensions"]
            .as_array()
            .ok_or("directive without Dimensions")?;
        for set in dim_sets {
            let mut dims: Vec<String> = set
                .as_array()
                .ok_or("dimension set is not a list")?
                .iter()
                .filter_map(|d| d.as_str().map(String::from))
                .collect();
            dims.sort();
            for m in d["Metrics"].as_array().ok_or("directive without Metrics")? {
                let name = m["Name"].as_str().ok_or("metric without Name")?;
                out.push(MetricKey {
                    namespace: namespace.into(),
                    name: name.into(),
                    dimensions: dims.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// The metrics a CloudWatch dashboard body's widgets name: plain metric rows
/// (`[namespace, name, dim, value, ..., {options}]`) and `SEARCH('{namespace,dim,...}
/// MetricName="name"', ...)` expressions. Any other metric entry is an error, so nothing escapes
/// the check.
pub fn dashboard_metric_keys(body: &str) -> Result<Vec<MetricKey>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("dashboard is not JSON: {e}"))?;
    let widgets = v["widgets"].as_array().ok_or("dashboard without widgets")?;
    let mut out = Vec::new();
    for w in widgets {
        let title = w["properties"]["title"].as_str().unwrap_or("(untitled)");
        let Some(rows) = w["properties"]["metrics"].as_array() else {
            continue;
        };
        for row in rows {
            let items = row
                .as_array()
                .ok_or_else(|| format!("widget {title:?}: a metric row is not a list"))?;
            match items.first() {
                Some(Value::String(namespace)) => {
                    let name = items
                        .get(1)
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("widget {title:?}: row without a metric name"))?;
                    let strings: Vec<&str> = items[2..].iter().filter_map(Value::as_str).collect();
                    let mut dims: Vec<String> =
                        strings.chunks(2).map(|c| c[0].to_string()).collect();
                    dims.sort();
                    out.push(MetricKey {
                        namespace: namespace.clone(),
                        name: name.into(),
                        dimensions: dims,
                    });
                }
                Some(Value::Object(o)) => {
                    let expr = o.get("expression").and_then(Value::as_str).ok_or_else(|| {
                        format!("widget {title:?}: options row without expression")
                    })?;
                    out.push(search_key(expr).map_err(|e| format!("widget {title:?}: {e}"))?);
                }
                _ => return Err(format!("widget {title:?}: empty or unreadable metric row")),
            }
        }
    }
    Ok(out)
}

/// `SEARCH('{ns,dim1,dim2} MetricName="name"', ...)` -> its metric key.
fn search_key(expr: &str) -> Result<MetricKey, String> {
    let open = expr
        .find('{')
        .ok_or_else(|| format!("no {{schema}} in {expr:?}"))?;
    let close = expr[open..]
        .find('}')
        .ok_or_else(|| format!("unclosed schema in {expr:?}"))?
        + open;
    let mut parts = expr[open + 1..close].split(',').map(str::trim);
    let namespace = parts.next().unwrap_or_default().to_string();
    let mut dims: Vec<String> = parts.map(String::from).collect();
    dims.sort();
    let tag = "MetricName=\"";
    let at = expr
        .find(tag)
        .ok_or_else(|| format!("no MetricName=\"...\" in {expr:?}"))?
        + tag.len();
    let end = expr[at..]
        .find('"')
        .ok_or_else(|| format!("unclosed MetricName in {expr:?}"))?
        + at;
    Ok(MetricKey {
        namespace,
        name: expr[at..end].to_string(),
        dimensions: dims,
    })
}

/// The `.rs` files under `crate_dir/src` that write EMF (they name `bridge_shared::metrics` or
/// call `emf_line(`) but are not in `emitters` (paths relative to `crate_dir`). A crate's
/// dashboard-drift test reads only its known emitters, so any file listed here would slip past.
#[cfg(feature = "test-util")]
pub fn emf_writers_outside(
    crate_dir: &std::path::Path,
    emitters: &[&str],
) -> std::io::Result<Vec<String>> {
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                rust_files(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    rust_files(&crate_dir.join("src"), &mut files)?;
    let mut strays = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        if !(text.contains("bridge_shared::metrics") || text.contains("emf_line(")) {
            continue;
        }
        let rel = file
            .strip_prefix(crate_dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        if !emitters.contains(&rel.as_str()) {
            strays.push(rel);
        }
    }
    Ok(strays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_keys_come_from_rows_and_searches() {
        let body = r#"{"widgets": [
            {"type": "text", "properties": {"markdown": "x"}},
            {"type": "metric", "properties": {"title": "t", "metrics": [
                ["NS", "A", "Function", "f", {"label": "a"}],
                [{"expression": "SEARCH('{NS/B,Route} MetricName=\"b\"', 'Sum', 300)", "id": "e0"}]
            ]}}]}"#;
        let keys = dashboard_metric_keys(body).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].to_string(), "NS/A [Function]");
        assert_eq!(keys[1].to_string(), "NS/B/b [Route]");
        assert!(
            dashboard_metric_keys(r#"{"widgets": [{"properties": {"metrics": [[1]]}}]}"#).is_err()
        );
    }

    #[test]
    fn emf_keys_list_each_metric_with_its_dimensions() {
        let line = emf_line(
            "NS",
            &[("Route", "r"), ("A", "x")],
            &[("m", Metric::Count(1.0))],
            0,
        );
        let keys = emf_metric_keys(&line).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].to_string(), "NS/m [A,Route]");
    }

    #[test]
    fn emf_line_declares_each_metric_with_its_unit() {
        let line = emf_line(
            "Bridge",
            &[("Route", "r1")],
            &[("rows_in", Metric::Count(3.0))],
            1,
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["Route"], "r1");
        assert_eq!(v["rows_in"], 3.0);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "Count"
        );
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][0],
            "Route"
        );
    }
}
