//! A form: labelled one-line fields, edited with the keyboard alone. Up/Down (or Tab) move
//! between fields; printable keys type; Backspace erases; the screen decides what Enter and
//! Esc do. The focused field is marked with `>` and reversed, so it shows without colour.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

pub struct Field {
    pub label: &'static str,
    pub value: String,
    pub secret: bool,
    pub hint: &'static str,
}

pub struct Form {
    pub fields: Vec<Field>,
    pub focus: usize,
}

/// Longest value a field takes: every value the API accepts fits.
const FIELD_MAX: usize = 256;

impl Form {
    pub fn new(fields: &[(&'static str, &'static str)]) -> Form {
        Form {
            fields: fields
                .iter()
                .map(|(label, hint)| Field {
                    label,
                    value: String::new(),
                    secret: false,
                    hint,
                })
                .collect(),
            focus: 0,
        }
    }

    pub fn secret(mut self, i: usize) -> Form {
        self.fields[i].secret = true;
        self
    }

    pub fn with(mut self, i: usize, v: impl Into<String>) -> Form {
        self.fields[i].value = v.into();
        self
    }

    pub fn value(&self, i: usize) -> &str {
        self.fields[i].value.trim()
    }

    /// Editing keys; false when the key is not the form's (Enter, Esc, function keys).
    pub fn key(&mut self, k: KeyEvent) -> bool {
        let n = self.fields.len();
        match k.code {
            KeyCode::Down | KeyCode::Tab => self.focus = (self.focus + 1) % n,
            KeyCode::Up | KeyCode::BackTab => self.focus = (self.focus + n - 1) % n,
            KeyCode::Backspace => {
                self.fields[self.focus].value.pop();
            }
            KeyCode::Char('u') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                self.fields[self.focus].value.clear();
            }
            KeyCode::Char(c) if !k.modifiers.contains(KeyModifiers::CONTROL) => {
                let v = &mut self.fields[self.focus].value;
                if v.len() < FIELD_MAX {
                    v.push(c);
                }
            }
            _ => return false,
        }
        true
    }

    /// One line per field: `> Label ........ value_` and its hint.
    pub fn lines(&self) -> Vec<Line<'static>> {
        self.fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let focused = i == self.focus;
                let shown = if f.secret {
                    "*".repeat(f.value.chars().count())
                } else {
                    f.value.clone()
                };
                let mut value = format!("{shown}{}", if focused { "_" } else { "" });
                // The value's column is 44 wide; longer values show their end.
                let width = 44;
                if value.chars().count() > width {
                    let skip = value.chars().count() - width;
                    value = value.chars().skip(skip).collect();
                }
                let style = if focused {
                    Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
                } else {
                    Style::default()
                };
                Line::from(vec![
                    Span::raw(if focused { "> " } else { "  " }),
                    Span::raw(format!("{:<18}", f.label)),
                    Span::styled(format!("{value:<width$}"), style),
                    Span::raw(format!(" {}", f.hint)),
                ])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn typing_moving_and_secrets() {
        let mut f = Form::new(&[("A", ""), ("B", "")]).secret(1);
        for c in "ab".chars() {
            assert!(f.key(k(KeyCode::Char(c))));
        }
        f.key(k(KeyCode::Backspace));
        f.key(k(KeyCode::Down));
        for c in "pw".chars() {
            f.key(k(KeyCode::Char(c)));
        }
        assert_eq!((f.value(0), f.value(1)), ("a", "pw"));
        let text: String = f.lines()[1]
            .spans
            .iter()
            .map(|s| s.content.as_ref())
            .collect();
        assert!(text.starts_with("> B") && text.contains("**_") && !text.contains("pw"));
        f.key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        assert_eq!(f.value(1), "");
        f.key(k(KeyCode::Down));
        assert_eq!(f.focus, 0, "the focus wraps");
        assert!(!f.key(k(KeyCode::Enter)), "Enter is the screen's");
    }
}
