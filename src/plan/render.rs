//! A [`Plan`] as text: per object a unified diff of its fields (as `kubectl diff` prints),
//! the fields taken over by manager, refusals with the API server's message, and the rollout
//! impact; or the whole plan as YAML or JSON.

use std::fmt::Write;

use super::{Action, Cause, ObjectChange, Plan, diff};

/// How `meshwarden plan` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Diff,
    Yaml,
    Json,
}

/// Lines of context around each change of a diff.
const CONTEXT: usize = 3;

pub fn render(plan: &Plan, output: Output) -> crate::error::Result<String> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(plan)? + "\n",
        Output::Yaml => serde_yaml::to_string(plan)
            .map_err(|e| crate::error::Error::InvalidSpec(format!("cannot print YAML: {e}")))?,
        Output::Diff => text(plan),
    })
}

fn yaml(v: &Option<serde_json::Value>) -> String {
    v.as_ref()
        .and_then(|v| serde_yaml::to_string(v).ok())
        .unwrap_or_default()
}

fn text(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "MeshPolicy {}: what Enforce would write (every section in Enforce; dry runs, nothing written)",
        plan.policy
    );
    for n in &plan.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for c in &plan.changes {
        out.push('\n');
        let what = match c.action {
            Action::Create => "created",
            Action::Update => "updated",
            Action::Delete => "deleted",
            Action::Unchanged => "written, no field changes",
            Action::Refused => "REFUSED by the API server",
        };
        let mark = match c.action {
            Action::Create => '+',
            Action::Update => '~',
            Action::Delete => '-',
            Action::Unchanged => '=',
            Action::Refused => '!',
        };
        let _ = write!(out, "{mark} {} ({what}", c.id());
        if let Some(r) = &c.rollout {
            match r.pods {
                Some(1) => out.push_str("; its pods roll: 1 pod"),
                Some(n) => {
                    let _ = write!(out, "; its pods roll: {n} pods");
                }
                None => out.push_str("; its pods roll"),
            }
        }
        out.push_str(")\n");
        match c.rollout.as_ref().and_then(|r| r.cause) {
            Some(Cause::Sidecars) => {
                out.push_str("  a sidecar rollout (its proxy resources change)\n")
            }
            Some(Cause::Restart) => {
                out.push_str("  a restart by the upgrades section (its proxies are outdated)\n")
            }
            None => {}
        }
        if let Some(m) = &c.refused {
            let _ = writeln!(out, "  refused: {m}");
            let name = c.id();
            for s in plan
                .stopped_sections
                .iter()
                .filter(|s| s.at.contains(&name))
            {
                let _ = writeln!(out, "  {} stops here: {}", s.section, s.message);
            }
        }
        for t in &c.takeovers {
            let lines = [
                (&t.fields, format!("takes over from {}", t.manager)),
                (
                    &t.shared,
                    format!("owns with {} (the same value, so both own it)", t.manager),
                ),
            ];
            for (fields, how) in lines.iter().filter(|(f, _)| !f.is_empty()) {
                let _ = writeln!(out, "  {how}: {}", fields.join(", "));
            }
        }
        if !c.released.is_empty() {
            let _ = writeln!(
                out,
                "  no longer declared, values kept: {}",
                c.released.join(", ")
            );
        }
        if c.action == Action::Refused {
            if let Some(sent) = &c.sent {
                out.push_str("  the apply it sent:\n");
                for l in yaml(&Some(sent.clone())).lines() {
                    let _ = writeln!(out, "    {l}");
                }
            }
            continue;
        }
        let name = c.id();
        let (from, to) = match c.action {
            Action::Create => ("/dev/null".to_string(), format!("{name} (after)")),
            Action::Delete => (format!("{name} (live)"), "/dev/null".to_string()),
            _ => (format!("{name} (live)"), format!("{name} (after)")),
        };
        out.push_str(&diff::unified(
            &yaml(&c.before),
            &yaml(&c.after),
            &from,
            &to,
            CONTEXT,
        ));
    }
    if !plan.not_written.is_empty() {
        out.push_str("\nNot written:\n");
        for n in &plan.not_written {
            let _ = writeln!(
                out,
                "  {} {} ({}): {}",
                n.action, n.object, n.section, n.message
            );
        }
    }
    for f in &plan.failed_sections {
        let _ = writeln!(
            out,
            "\nerror: {} could not be evaluated ({}): {}",
            f.section, f.action, f.message
        );
    }
    out.push('\n');
    out.push_str(&summary(plan));
    out.push('\n');
    out
}

/// The closing line: how many objects each action touches, and the rollouts.
pub fn summary(plan: &Plan) -> String {
    let count = |a: Action| plan.changes.iter().filter(|c| c.action == a).count();
    let rolls: Vec<&ObjectChange> = plan
        .changes
        .iter()
        .filter(|c| c.rollout.is_some())
        .collect();
    let pods: i64 = rolls
        .iter()
        .filter_map(|c| c.rollout.as_ref().and_then(|r| r.pods))
        .sum();
    let held = plan
        .not_written
        .iter()
        .filter(|n| n.action == "Held")
        .count();
    let mut s = format!(
        "Plan: {} to create, {} to update, {} to delete, {} refused",
        count(Action::Create),
        count(Action::Update),
        count(Action::Delete),
        count(Action::Refused)
    );
    let _ = write!(
        s,
        "; {} workload(s) roll ({pods} pods), {held} held",
        rolls.len()
    );
    for (what, w) in [
        ("sidecars roll", &plan.waves),
        ("restarts run", &plan.restart_waves),
    ] {
        if let Some(w) = w {
            let _ = write!(
                s,
                "; {what} in {} paced wave(s) of at most {} ({} now, {} waiting for a slot)",
                w.waves, w.max_concurrent, w.now, w.waiting
            );
        }
    }
    if !plan.pending() {
        s = format!("No changes: Enforce would write nothing now ({held} held).");
    }
    s
}
