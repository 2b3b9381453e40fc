//! Kubernetes resource quantities compared by value (`500m` equals `0.5`, `1Gi` equals
//! `1024Mi`), so a container that already has the declared resources is left alone.

/// The value of a quantity in thousandths of its unit, or `None` if it is not a quantity.
pub fn millis(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    if num.is_empty() {
        return None;
    }
    let (mult_num, mult_den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1000_i128.pow(2), 1),
        "G" => (1000 * 1000_i128.pow(3), 1),
        "T" => (1000 * 1000_i128.pow(4), 1),
        "P" => (1000 * 1000_i128.pow(5), 1),
        "E" => (1000 * 1000_i128.pow(6), 1),
        "Ki" => (1000 * 1024, 1),
        "Mi" => (1000 * 1024_i128.pow(2), 1),
        "Gi" => (1000 * 1024_i128.pow(3), 1),
        "Ti" => (1000 * 1024_i128.pow(4), 1),
        "Pi" => (1000 * 1024_i128.pow(5), 1),
        "Ei" => (1000 * 1024_i128.pow(6), 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().ok()?;
            if exp >= 0 {
                (1000 * 10_i128.checked_pow(exp as u32)?, 1)
            } else {
                (1000, 10_i128.checked_pow((-exp) as u32)?)
            }
        }
        _ => return None,
    };
    let negative = num.starts_with('-');
    let digits = num.trim_start_matches(['+', '-']);
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let scale = 10_i128.checked_pow(frac_part.len() as u32)?;
    let int: i128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let frac: i128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().ok()?
    };
    let value = (int * scale + frac).checked_mul(mult_num)?;
    // Round up like Kubernetes does for sub-milli precision.
    let den = scale * mult_den;
    let v = (value + den - 1) / den;
    Some(if negative { -v } else { v })
}

/// True when both strings are quantities of the same value.
pub fn same(a: &str, b: &str) -> bool {
    match (millis(a), millis(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_in_different_forms() {
        assert!(same("500m", "0.5"));
        assert!(same("1", "1000m"));
        assert!(same("1Gi", "1024Mi"));
        assert!(same("2G", "2000M"));
        assert!(same("1e3", "1k"));
        assert!(!same("1Gi", "1G"));
        assert!(!same("100m", "1"));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(millis("lots"), None);
        assert_eq!(millis(""), None);
        assert_eq!(millis("1Zi"), None);
    }

    #[test]
    fn values() {
        assert_eq!(millis("250m"), Some(250));
        assert_eq!(millis("2"), Some(2000));
        assert_eq!(millis("128Mi"), Some(128 * 1024 * 1024 * 1000));
    }
}
