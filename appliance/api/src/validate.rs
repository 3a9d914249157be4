//! Validation rules shared by every front end.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A refused value: which field, and why, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize, JsonSchema)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Longest name: a DNS label, so a name can become a host name, a file name or a label.
pub const NAME_MAX: usize = 63;
/// Longest free-text field (descriptions, hook commands): keeps objects small.
pub const TEXT_MAX: usize = 1024;

/// Names are 1..=63 of `a-z`, `0-9` and `-`, starting and ending with a letter or digit. They go
/// into URLs, storage keys and certificate subjects, so nothing there needs escaping.
pub fn name(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() || value.len() > NAME_MAX {
        return Err(Invalid::new(
            field,
            format!("must be 1 to {NAME_MAX} characters, not {}", value.len()),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Invalid::new(
            field,
            format!("{value:?} may hold only a-z, 0-9 and '-'"),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(Invalid::new(
            field,
            format!("{value:?} must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

/// Free text: bounded, and without control characters that would garble logs and tables.
pub fn text(field: &str, value: &str) -> Result<(), Invalid> {
    if value.len() > TEXT_MAX {
        return Err(Invalid::new(
            field,
            format!("at most {TEXT_MAX} bytes, not {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not hold control characters"));
    }
    Ok(())
}

/// An inclusive range check with the range in the message.
pub fn range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), Invalid> {
    if value < min || value > max {
        return Err(Invalid::new(
            field,
            format!("must be between {min} and {max}, not {value}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "acme", "web-01", "0", &"x".repeat(63)] {
            name("n", ok).unwrap();
        }
        for bad in [
            "",
            "Acme",
            "-a",
            "a-",
            "a_b",
            "a/b",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            let e = name("n", bad).unwrap_err();
            assert_eq!(e.field, "n", "{bad:?}");
        }
    }

    #[test]
    fn texts_and_ranges() {
        text("t", "hello world").unwrap();
        assert!(text("t", "a\nb").is_err());
        assert!(text("t", &"x".repeat(TEXT_MAX + 1)).is_err());
        range("r", 5, 1, 5).unwrap();
        assert_eq!(
            range("r", 6, 1, 5).unwrap_err().to_string(),
            "r: must be between 1 and 5, not 6"
        );
    }
}

/// `HOST:PORT` split into its host (an IPv6 literal without its brackets) and a port above 0;
/// none when it is not of that form. The one parse of a dialled address (a master target's,
/// a role's reported one).
pub fn host_port(addr: &str) -> Option<(&str, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    let host = h.trim_start_matches('[').trim_end_matches(']');
    let port = p.parse::<u16>().ok().filter(|&p| p > 0)?;
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod host_port_tests {
    use super::host_port;

    #[test]
    fn splits_names_addresses_and_ipv6_literals() {
        assert_eq!(host_port("mt.example:7443"), Some(("mt.example", 7443)));
        assert_eq!(host_port("127.0.0.1:1"), Some(("127.0.0.1", 1)));
        assert_eq!(host_port("[::1]:7443"), Some(("::1", 7443)));
        for bad in ["mt", ":7443", "mt:0", "mt:x", "mt:70000", ""] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
