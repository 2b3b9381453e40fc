//! Sentences the sections' condition messages share, worded once.

/// `a, b, c and 4 more`: at most `max` items named.
pub fn list(items: &[String], max: usize) -> String {
    let shown: Vec<&str> = items.iter().take(max).map(String::as_str).collect();
    if items.len() > max {
        format!("{} and {} more", shown.join(", "), items.len() - max)
    } else {
        shown.join(", ")
    }
}

/// `deviations: <object> <message>; …`, the first `max` of `violations`; `None` when there
/// are none.
pub fn deviations_sentence<'a>(
    violations: impl IntoIterator<Item = &'a crate::api::Violation>,
    max: usize,
) -> Option<String> {
    let shown: Vec<String> = violations
        .into_iter()
        .take(max)
        .map(|v| format!("{} {}", v.object, v.message))
        .collect();
    (!shown.is_empty()).then(|| format!("deviations: {}", shown.join("; ")))
}

/// The sentence naming fields meshwarden took over from other managers.
pub fn takeover_sentence(takeovers: &[String]) -> Option<String> {
    (!takeovers.is_empty()).then(|| {
        format!(
            "meshwarden took over fields another manager set: {}; change the source (Helm values, Git) so it stops setting other values",
            takeovers.join(", ")
        )
    })
}

/// What a fight holds back: whole objects, or only the contested fields of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contested {
    Objects,
    Fields,
}

/// The sentence naming what meshwarden stopped rewriting because of a fight.
pub fn fight_sentence(fights: &[String], contested: Contested) -> Option<String> {
    let what = match contested {
        Contested::Objects => "them",
        Contested::Fields => "these fields",
    };
    let rest = match contested {
        Contested::Objects => "",
        Contested::Fields => " (everything else is still held)",
    };
    (!fights.is_empty()).then(|| {
        format!(
            "{} keep being changed back by another writer; meshwarden stopped rewriting {what} for 10 minutes{rest}: find the other writer (kubectl get -o yaml --show-managed-fields)",
            list(fights, 5)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_bounded_and_fights_name_the_hint() {
        let items: Vec<String> = (1..=7).map(|i| format!("o{i}")).collect();
        assert_eq!(list(&items[..2], 5), "o1, o2");
        assert_eq!(list(&items, 5), "o1, o2, o3, o4, o5 and 2 more");
        assert_eq!(fight_sentence(&[], Contested::Objects), None);
        let s = fight_sentence(&items[..1], Contested::Fields).unwrap();
        assert!(
            s.contains("these fields") && s.contains("--show-managed-fields"),
            "{s}"
        );
        assert!(takeover_sentence(&[]).is_none());
    }
}
