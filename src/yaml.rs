//! YAML that every Kubernetes tool reads back as written.
//!
//! `serde_yaml` (serde_norway) quotes a string only when a YAML 1.2 parser would read it as
//! something else. kubectl and Helm parse with go-yaml, which follows YAML 1.1 there: `Off`,
//! `On`, `yes`, `no`, `y`, `n` are booleans and `0o17`, `1_000`, `1:30` numbers. An enum value
//! `Off` written plain becomes `false` when the CRD is applied with kubectl. [`to_string`]
//! double-quotes those strings too.

use serde::Serialize;
use serde_yaml::Value;

/// Marks a string to be quoted; never part of a real value (checked).
const MARK: &str = "meshwardenquoted";

/// Serializes `value` as YAML in which no string reads as a boolean, null or number under
/// YAML 1.1 or YAML 1.2.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_yaml::Error> {
    let mut tree = serde_yaml::to_value(value)?;
    let mut hidden = Vec::new();
    mark(&mut tree, &mut hidden);
    // Each marked string is written plain as its placeholder, which is then replaced by the
    // string in double quotes (a JSON string is a valid YAML double-quoted scalar).
    let mut text = serde_yaml::to_string(&tree)?;
    for (i, s) in hidden.iter().enumerate() {
        let quoted =
            serde_json::to_string(s).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
        text = text.replace(&placeholder(i), &quoted);
    }
    Ok(text)
}

fn placeholder(i: usize) -> String {
    // The trailing `q` keeps `…1q` from matching inside `…10q`.
    format!("{MARK}{i}q")
}

fn mark(v: &mut Value, hidden: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if s.contains(MARK) || read_as_non_string_by_yaml_1_1(s) {
                hidden.push(std::mem::take(s));
                *s = placeholder(hidden.len() - 1);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| mark(i, hidden)),
        Value::Mapping(m) => {
            let entries = std::mem::take(m);
            for (mut k, mut val) in entries {
                mark(&mut k, hidden);
                mark(&mut val, hidden);
                m.insert(k, val);
            }
        }
        Value::Tagged(t) => mark(&mut t.value, hidden),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Whether a plain scalar `s` would not be a string to a YAML 1.1 parser (go-yaml, used by
/// kubectl and Helm). Errs on the side of quoting: a string quoted needlessly reads the same.
fn read_as_non_string_by_yaml_1_1(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "yes", "n", "no", "on", "off", "true", "false", "null", "~", "=", "<<",
    ];
    let lower = s.to_ascii_lowercase();
    if WORDS.contains(&lower.as_str()) {
        return true;
    }
    let unsigned = lower.strip_prefix(['+', '-']).unwrap_or(&lower);
    if matches!(unsigned, ".inf" | ".nan") {
        return true;
    }
    // Integers in base 2, 8, 10, 16 or 60 with `_` separators, floats, timestamps.
    let numeric_start = unsigned.starts_with(|c: char| c.is_ascii_digit())
        || (unsigned.starts_with('.') && unsigned[1..].starts_with(|c: char| c.is_ascii_digit()));
    numeric_start
        && unsigned
            .chars()
            .all(|c| c.is_ascii_hexdigit() || "_.:+-xob".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_1_1_booleans_and_numbers_are_quoted() {
        let hazards = [
            "Off",
            "OFF",
            "off",
            "On",
            "yes",
            "Yes",
            "no",
            "NO",
            "y",
            "Y",
            "n",
            "N",
            "true",
            "False",
            "null",
            "~",
            "1",
            "0o17",
            "017",
            "0b101",
            "0x1F",
            "1_000",
            "1:30",
            "1e3",
            "-1",
            "+.inf",
            ".NaN",
            "2001-12-14",
            "=",
            "<<",
        ];
        let text = to_string(&hazards).unwrap();
        for h in hazards {
            let quoted = serde_json::to_string(h).unwrap();
            assert!(
                text.lines().any(|l| l == format!("- {quoted}")),
                "{h} not double-quoted in:\n{text}"
            );
        }
        let back: Vec<String> = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, hazards);
    }

    #[test]
    fn ordinary_strings_stay_plain_and_keys_are_covered() {
        let v = serde_json::json!({
            "enum": ["Required", "Preferred", "Off"],
            "pacing": "Paced",
            "cpu": "500m",
            "memory": "2Gi",
            "on": "Offset",
            "description": "line one\nOff\n",
        });
        let text = to_string(&v).unwrap();
        for line in [
            "- Required",
            "- \"Off\"",
            "pacing: Paced",
            "cpu: 500m",
            "memory: 2Gi",
        ] {
            assert!(text.lines().any(|l| l.trim() == line), "{line} in:\n{text}");
        }
        assert!(text.contains("\"on\": Offset"), "{text}");
        // Inside a block scalar nothing is touched.
        assert!(text.contains("  Off\n"), "{text}");
        let back: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_string_holding_the_marker_round_trips() {
        let v = vec![format!("{MARK}0q"), "Off".to_string()];
        let back: Vec<String> = serde_yaml::from_str(&to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}
