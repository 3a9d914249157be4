//! Comparing image versions the way systemd-boot does.
//!
//! systemd-boot chooses among the boot entries by their `IMAGE_VERSION` (newest first), using the
//! UAPI version format comparison (systemd's `strverscmp_improved`, the "Version Format
//! Specification" of the UAPI group). An update is only worth installing if systemd-boot will
//! choose it, so `ferry update` compares versions with the very same rules:
//!
//! - a version is a sequence of segments, each all digits or all letters; other characters than
//!   `~ - ^ .` separate segments and are otherwise ignored;
//! - digit segments compare as numbers (`2026.12.1` is newer than `2026.9.30`, `10` than `9`,
//!   leading zeros do not count); a digit segment is newer than a letter segment;
//! - `~` marks a pre-release: `1.2~rc1` is older than `1.2`;
//! - `-` separates version and release: `1.2-3` is older than `1.2.1`, but newer than `1.2`;
//! - `^` marks a patched release, `.` a point release; with one string at its end and the other
//!   not, the longer is newer (`1.2.1` newer than `1.2`).
//!
//! Note for semver users: `1.2.3-rc1` is therefore NEWER than `1.2.3` here (as in systemd-boot);
//! a pre-release is written `1.2.3~rc1`.

use std::cmp::Ordering;

fn valid(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.')
}

/// `a` compared with `b`: `Greater` when `a` is the newer version.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    let first = |s: &[u8]| s.first().copied().unwrap_or(0);
    loop {
        while !a.is_empty() && !valid(a[0]) {
            a = &a[1..];
        }
        while !b.is_empty() && !valid(b[0]) {
            b = &b[1..];
        }
        // A pre-release segment is older than anything, even the end of the string.
        if first(a) == b'~' || first(b) == b'~' {
            let r = (first(a) != b'~').cmp(&(first(b) != b'~'));
            if r != Ordering::Equal {
                return r;
            }
            a = &a[1..];
            b = &b[1..];
        }
        if a.is_empty() || b.is_empty() {
            return first(a).cmp(&first(b));
        }
        for sep in [b'-', b'^', b'.'] {
            if first(a) == sep || first(b) == sep {
                let r = (first(a) != sep).cmp(&(first(b) != sep));
                if r != Ordering::Equal {
                    return r;
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
        let (sa, sb);
        if first(a).is_ascii_digit() || first(b).is_ascii_digit() {
            let la = a.iter().take_while(|c| c.is_ascii_digit()).count();
            let lb = b.iter().take_while(|c| c.is_ascii_digit()).count();
            // A number is newer than no number (a letter segment or nothing).
            let r = (la > 0).cmp(&(lb > 0));
            if r != Ordering::Equal {
                return r;
            }
            let na = a[..la].iter().skip_while(|&&c| c == b'0').count();
            let nb = b[..lb].iter().skip_while(|&&c| c == b'0').count();
            // Without leading zeros, the longer number is the larger; same length: by digits.
            let r = na
                .cmp(&nb)
                .then_with(|| a[la - na..la].cmp(&b[lb - nb..lb]));
            if r != Ordering::Equal {
                return r;
            }
            (sa, sb) = (la, lb);
        } else {
            let la = a.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let lb = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let n = la.min(lb);
            let r = a[..n].cmp(&b[..n]).then(la.cmp(&lb));
            if r != Ordering::Equal {
                return r;
            }
            (sa, sb) = (la, lb);
        }
        // Every pass consumes a separator or a segment: a valid character is one or the other.
        a = &a[sa..];
        b = &b[sb..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn systemds_own_order() {
        // The ordering documented with systemd's strverscmp_improved, oldest first.
        let order = [
            "122.1",
            "123~rc1-1",
            "123",
            "123-a",
            "123-a.1",
            "123-1",
            "123-1.1",
            "123^post1",
            "123.a-1",
            "123.1-1",
            "123a-1",
            "124-1",
        ];
        for (i, a) in order.iter().enumerate() {
            for (j, b) in order.iter().enumerate() {
                assert_eq!(compare(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn numbers_compare_as_numbers_not_as_text() {
        assert_eq!(compare("2.10", "2.9"), Greater);
        assert_eq!(compare("10", "9"), Greater);
        assert_eq!(compare("2026.12.01.000000", "2026.11.30.235959"), Greater);
        assert_eq!(compare("1.02", "1.2"), Equal);
        assert_eq!(compare("1.2.3", "1.2.3"), Equal);
        assert_eq!(compare("1.2.10", "1.2.9"), Greater);
        assert_eq!(compare("2.0", "10.0"), Less);
    }

    #[test]
    fn more_segments_are_newer_and_pre_releases_older() {
        // The boot test's next releases: BASE.1, BASE.2 after BASE.
        assert_eq!(compare("2026.11.30.101010.1", "2026.11.30.101010"), Greater);
        assert_eq!(
            compare("2026.11.30.101010.2", "2026.11.30.101010.1"),
            Greater
        );
        assert_eq!(compare("1.2~rc1", "1.2"), Less);
        assert_eq!(compare("1.2~rc1", "1.2~rc2"), Less);
        assert_eq!(compare("1.2~rc2", "1.1"), Greater);
        // Unlike semver: systemd-boot sorts "-rc1" after the plain version.
        assert_eq!(compare("1.2.3-rc1", "1.2.3"), Greater);
        assert_eq!(compare("1.0a", "1.0"), Greater);
        assert_eq!(compare("1.0", "1.0a"), Less);
        assert_eq!(compare("1.0a", "1.0.1"), Greater);
    }

    #[test]
    fn odd_strings_end_and_are_consistent() {
        let odd = [
            "", "..", "1..2", "1-.2", "_", "a_b", "1_2", "~", "~~1", "^", "1^^", "-",
        ];
        for a in odd.iter().chain(["1", "1.2", "a"].iter()) {
            for b in odd.iter().chain(["1", "1.2", "a"].iter()) {
                assert_eq!(compare(a, b), compare(b, a).reverse(), "{a:?} vs {b:?}");
            }
            assert_eq!(compare(a, a), Equal, "{a:?}");
        }
    }
}
