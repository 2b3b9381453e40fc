//! The image `hack/image.sh` builds (buildah, here) and the one the Dockerfile builds (the
//! published recipe) have the same contract: user, entrypoint and command, exposed port, OCI
//! labels. The Dockerfile's final stage is read here; `hack/image.sh --config` prints what the
//! script gives its image (and the script checks its committed image against that). And the
//! operator's command line accepts the args the chart's Deployment gives it.

#[path = "support/tools.rs"]
mod tools;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The instructions of the Dockerfile's last stage, continuation lines joined, comments out.
fn final_stage(dockerfile: &str) -> Vec<String> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = joined
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    joined.split_off(last_from)
}

/// `["a", "b"]` (exec form) as `a b`.
fn exec_form(value: &str) -> String {
    let items: Vec<String> = serde_json::from_str(value).expect("exec form: a JSON array");
    items.join(" ")
}

/// `k="v" k2="v 2"` as (k, v) pairs.
fn label_pairs(mut rest: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        let Some((key, tail)) = rest.split_once("=\"") else {
            break;
        };
        let (value, tail) = tail.split_once('"').expect("a closing quote");
        out.push((key.to_string(), value.to_string()));
        rest = tail;
    }
    out
}

/// The contract of the Dockerfile's final stage, in the form `hack/image.sh --config` prints.
fn dockerfile_contract() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile");
    let mut out = BTreeSet::new();
    for instruction in final_stage(&text) {
        let (word, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        let rest = rest.trim();
        match word {
            "USER" => out.insert(format!("user={rest}")),
            "ENTRYPOINT" => out.insert(format!("entrypoint={}", exec_form(rest))),
            "CMD" => out.insert(format!("cmd={}", exec_form(rest))),
            "EXPOSE" => out.insert(format!(
                "port={}",
                if rest.contains('/') {
                    rest.to_string()
                } else {
                    format!("{rest}/tcp")
                }
            )),
            "LABEL" => {
                for (k, v) in label_pairs(rest) {
                    out.insert(format!("label={k}={v}"));
                }
                true
            }
            _ => true,
        };
    }
    out
}

#[test]
fn hack_image_sh_gives_the_image_the_dockerfile_contract() {
    let dockerfile = dockerfile_contract();
    for key in ["user=", "entrypoint=", "cmd=", "port=", "label="] {
        assert!(
            dockerfile.iter().any(|l| l.starts_with(key)),
            "the Dockerfile's final stage sets no {key}: {dockerfile:?}"
        );
    }
    assert!(dockerfile.contains("user=65532:65532"), "{dockerfile:?}");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/image.sh"))
        .arg("--config")
        .output()
        .expect("bash hack/image.sh --config");
    assert!(out.status.success(), "{out:?}");
    let script: BTreeSet<String> = String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        script, dockerfile,
        "hack/image.sh --config (left) and the Dockerfile's final stage (right) differ"
    );
}

#[test]
fn the_dockerfile_is_read_instruction_by_instruction() {
    let stage = final_stage(
        "FROM a AS b\nRUN x \\\n  y\n# c\nFROM z\nLABEL k=\"v 1\" \\\n      l=\"w\"\nUSER 1:1\n",
    );
    assert_eq!(stage, ["FROM z", "LABEL k=\"v 1\" l=\"w\"", "USER 1:1"]);
    assert_eq!(
        label_pairs("k=\"v 1\" l=\"w\""),
        [("k".into(), "v 1".into()), ("l".into(), "w".into())]
    );
}

#[test]
fn the_operator_accepts_the_args_the_chart_gives_it() {
    // The Deployment as `helm template` renders it with the default values, and with every
    // optional feature on.
    let root = env!("CARGO_MANIFEST_DIR");
    for values in [None, Some("charts/meshwarden/ci/all-features-values.yaml")] {
        let mut args = vec![
            "template".to_string(),
            "meshwarden".into(),
            format!("{root}/charts/meshwarden"),
            "--show-only".into(),
            "templates/deployment.yaml".into(),
        ];
        if let Some(v) = values {
            args.extend(["-f".into(), format!("{root}/{v}")]);
        }
        let out = Command::new(tools::tool("helm"))
            .args(&args)
            .output()
            .expect("helm");
        assert!(out.status.success(), "{out:?}");
        let deployment: serde_json::Value =
            serde_yaml::from_slice(&out.stdout).expect("the Deployment");
        let chart_args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("a string"))
            .collect();
        assert_eq!(chart_args.first(), Some(&"run"), "{chart_args:?}");
        // `--help` after them: the command line is parsed up to it, then help is printed;
        // an argument it refuses stops it first.
        let out = Command::new(env!("CARGO_BIN_EXE_meshwarden"))
            .args(&chart_args)
            .arg("--help")
            .output()
            .expect("meshwarden");
        assert!(
            out.status.success(),
            "meshwarden {chart_args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
