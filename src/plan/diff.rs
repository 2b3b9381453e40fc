//! Unified diffs of two texts, line by line (what `kubectl diff` and `diff -u` print).

/// One line of an edit script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// The shortest edit script from `a` to `b` (a longest common subsequence; objects are a few
/// hundred lines, so the quadratic table is small).
fn edits<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<Line<'a>> {
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: length of the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n.max(m));
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push(Line::Same(a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(Line::Removed(a[i]));
            i += 1;
        } else {
            out.push(Line::Added(b[j]));
            j += 1;
        }
    }
    out
}

/// The unified diff of `a` and `b` with `context` lines around each change, headed by
/// `--- from` and `+++ to`; empty when the texts are equal.
pub fn unified(a: &str, b: &str, from: &str, to: &str, context: usize) -> String {
    let (al, bl): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let script = edits(&al, &bl);
    let changed: Vec<usize> = (0..script.len())
        .filter(|&k| !matches!(script[k], Line::Same(_)))
        .collect();
    if changed.is_empty() {
        return String::new();
    }
    // Hunks: runs of the script around changes, merged when their context touches.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let (start, end) = (
            k.saturating_sub(context),
            (k + context + 1).min(script.len()),
        );
        match hunks.last_mut() {
            Some(h) if start <= h.1 => h.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    let mut out = format!("--- {from}\n+++ {to}\n");
    // Line numbers in `a` and `b` at each position of the script.
    let mut at = Vec::with_capacity(script.len() + 1);
    let (mut x, mut y) = (1, 1);
    for l in &script {
        at.push((x, y));
        match l {
            Line::Same(_) => (x, y) = (x + 1, y + 1),
            Line::Removed(_) => x += 1,
            Line::Added(_) => y += 1,
        }
    }
    for (start, end) in hunks {
        let part = &script[start..end];
        let old = part.iter().filter(|l| !matches!(l, Line::Added(_))).count();
        let new = part
            .iter()
            .filter(|l| !matches!(l, Line::Removed(_)))
            .count();
        let (x, y) = at[start];
        // An empty side is numbered by the line before it, as `diff -u` does.
        let (x, y) = (
            if old == 0 { x - 1 } else { x },
            if new == 0 { y - 1 } else { y },
        );
        out.push_str(&format!("@@ -{x},{old} +{y},{new} @@\n"));
        for l in part {
            let (mark, text) = match l {
                Line::Same(t) => (' ', t),
                Line::Removed(t) => ('-', t),
                Line::Added(t) => ('+', t),
            };
            out.push(mark);
            out.push_str(text);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "x", "y", 3), "");
    }

    #[test]
    fn a_change_is_shown_with_its_context_as_diff_u_does() {
        let a = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let b = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n10\n";
        // Changes four lines apart share a hunk with two lines of context (as in `diff -U2`),
        // six apart do not.
        let d = unified(a, b, "live", "after", 2);
        assert_eq!(
            d,
            "--- live\n+++ after\n@@ -3,7 +3,8 @@\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n 9\n+10\n"
        );
        let b = "1\ntwo\n3\n4\n5\n6\n7\n8\n9\nten\n";
        let a = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n";
        assert_eq!(
            unified(a, b, "live", "after", 2),
            "--- live\n+++ after\n@@ -1,4 +1,4 @@\n 1\n-2\n+two\n 3\n 4\n@@ -8,3 +8,3 @@\n 8\n 9\n-10\n+ten\n"
        );
    }

    #[test]
    fn a_created_object_is_all_added() {
        let d = unified("", "a: 1\nb: 2\n", "/dev/null", "after", 3);
        assert_eq!(
            d,
            "--- /dev/null\n+++ after\n@@ -0,0 +1,2 @@\n+a: 1\n+b: 2\n"
        );
        let d = unified("a: 1\n", "", "live", "/dev/null", 3);
        assert_eq!(d, "--- live\n+++ /dev/null\n@@ -1,1 +0,0 @@\n-a: 1\n");
    }
}
