//! Targeted edits of an inventory file's text, for the verbs that change the inventory on the
//! operator's behalf (`pgherd replace NAME --address A`). The file is the operator's: its
//! comments, order and layout are kept and only the one value changes. The editor is
//! line-based (block-style YAML, as every shipped inventory is written); every edit is then
//! verified by parsing the text before and after and comparing the two documents with only the
//! edited field changed, so a layout the editor does not understand is an error that says
//! "edit it by hand", never a silently different inventory.

use serde_json::Value;

/// Why an inventory edit was refused (the file is left as it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{origin}: no top-level `hosts:` block in block style; edit the address by hand")]
    NoHosts { origin: String },
    #[error("{origin}: no host named {name}")]
    NoSuchHost { origin: String, name: String },
    #[error("{origin}:{line}: host {name} has no `address:` line of its own; edit it by hand")]
    NoAddressLine {
        origin: String,
        name: String,
        line: usize,
    },
    #[error(
        "{origin}: host {name} is not written in block style (`- name: ...` and `address: ...` lines); edit it by hand"
    )]
    NotBlockStyle { origin: String, name: String },
    #[error("{address:?} is not a host name or an IP address")]
    BadAddress { address: String },
    #[error(
        "{origin}: the edit would change more than {name}'s address (a layout this editor does not know: anchors, merge keys?); edit it by hand"
    )]
    Unverified { origin: String, name: String },
    #[error("{origin}: cannot be read as YAML: {message}")]
    Yaml { origin: String, message: String },
}

/// Whether `a` can stand as an inventory address: a DNS name or an IPv4/IPv6 address, which
/// also keeps it a plain YAML scalar (no quoting, no `: ` or ` #` inside).
fn plausible_address(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 253
        && a.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
}

/// `value  # comment` → (`value` without quotes, the quote char used, the offset where the
/// value ends in `rest`).
fn scalar(rest: &str) -> (String, Option<char>, usize) {
    let lead = rest.len() - rest.trim_start().len();
    let body = &rest[lead..];
    if let Some(q) = body.chars().next().filter(|c| *c == '"' || *c == '\'')
        && let Some(close) = body[1..].find(q)
    {
        return (body[1..1 + close].to_string(), Some(q), lead + close + 2);
    }
    let end = body
        .find(" #")
        .or_else(|| body.find("\t#"))
        .unwrap_or(body.len());
    let end = body[..end].trim_end().len();
    (body[..end].to_string(), None, lead + end)
}

/// One `key: value` at the start of `s`, if it is one.
fn key_value(s: &str) -> Option<(&str, &str)> {
    let (k, v) = s.split_once(':')?;
    let k = k.trim();
    (!k.is_empty() && !k.contains(' ') && (v.is_empty() || v.starts_with([' ', '\t'])))
        .then_some((k, v))
}

/// The text of `line` without its line ending.
fn body(line: &str) -> &str {
    line.trim_end_matches(['\n', '\r'])
}

/// Returns `text` with host `name`'s `address:` set to `address` (unchanged text when it
/// already is). `origin` names the file in errors.
pub fn set_host_address(
    text: &str,
    origin: &str,
    name: &str,
    address: &str,
) -> Result<String, EditError> {
    if !plausible_address(address) {
        return Err(EditError::BadAddress {
            address: address.into(),
        });
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let no_hosts = || EditError::NoHosts {
        origin: origin.into(),
    };
    let start = lines
        .iter()
        .position(|l| {
            body(l)
                .strip_prefix("hosts:")
                .is_some_and(|r| r.trim().is_empty() || r.trim_start().starts_with('#'))
        })
        .ok_or_else(no_hosts)?;
    // The block ends at the next top-level key (a line starting in column 0 with anything but
    // a comment or a list dash: `hosts:` items may be written unindented).
    let end = (start + 1..lines.len())
        .find(|&i| {
            let b = body(lines[i]);
            !b.trim().is_empty() && !b.starts_with([' ', '\t', '#', '-'])
        })
        .unwrap_or(lines.len());
    // Items: lines whose first non-blank is `- ` at the first item's indentation.
    let dash = |i: usize| -> Option<usize> {
        let b = body(lines[i]);
        let t = b.trim_start();
        (t == "-" || t.starts_with("- ")).then_some(b.len() - t.len())
    };
    let first = (start + 1..end)
        .find(|&i| dash(i).is_some())
        .ok_or_else(no_hosts)?;
    let indent = dash(first).unwrap_or(0);
    let items: Vec<usize> = (first..end).filter(|&i| dash(i) == Some(indent)).collect();
    for (index, &item) in items.iter().enumerate() {
        let item_end = items.get(index + 1).copied().unwrap_or(end);
        // The item's own keys: the rest of the dash line, and the lines indented to its column.
        let field_col = indent + 2;
        let field = |i: usize| -> Option<(&str, &str, usize)> {
            let b = body(lines[i]);
            let col = if i == item {
                field_col
            } else {
                let t = b.trim_start();
                (b.len() - t.len() == field_col && !t.starts_with('#')).then_some(field_col)?
            };
            let s = b.get(col..)?;
            let (k, v) = key_value(s)?;
            Some((k, v, b.len() - v.len()))
        };
        let is_it = (item..item_end)
            .filter_map(field)
            .any(|(k, v, _)| k == "name" && scalar(v).0 == name);
        if !is_it {
            continue;
        }
        let Some((line, value_at)) = (item..item_end).find_map(|i| {
            field(i)
                .filter(|(k, v, _)| *k == "address" && !scalar(v).0.is_empty())
                .map(|(_, _, at)| (i, at))
        }) else {
            return Err(EditError::NoAddressLine {
                origin: origin.into(),
                name: name.into(),
                line: item + 1,
            });
        };
        let old_line = lines[line];
        let b = body(old_line);
        let (old, quote, len) = scalar(&b[value_at..]);
        if old == address {
            return Ok(text.to_string());
        }
        let lead = b[value_at..].len() - b[value_at..].trim_start().len();
        let new_value = match quote {
            Some(q) => format!("{q}{address}{q}"),
            None => address.to_string(),
        };
        let new_line = format!(
            "{}{}{}{}",
            &b[..value_at + lead],
            new_value,
            &b[value_at + len..],
            &old_line[b.len()..]
        );
        let mut out = String::with_capacity(text.len() + address.len());
        for (i, l) in lines.iter().enumerate() {
            out.push_str(if i == line { &new_line } else { l });
        }
        verify(text, &out, origin, name, index, address)?;
        return Ok(out);
    }
    // Not found line by line: a flow-style entry (`- {name: x, ...}`) the document has.
    let listed = crate::yaml::from_str::<Value>(text)
        .ok()
        .and_then(|d| d.get("hosts").and_then(Value::as_array).cloned())
        .is_some_and(|hs| {
            hs.iter()
                .any(|h| h.get("name").and_then(Value::as_str) == Some(name))
        });
    if listed {
        return Err(EditError::NotBlockStyle {
            origin: origin.into(),
            name: name.into(),
        });
    }
    Err(EditError::NoSuchHost {
        origin: origin.into(),
        name: name.into(),
    })
}

/// The edited document must equal the original with `hosts[index].address` set, and that
/// host must be `name`.
fn verify(
    before: &str,
    after: &str,
    origin: &str,
    name: &str,
    index: usize,
    address: &str,
) -> Result<(), EditError> {
    let parse = |t: &str| {
        crate::yaml::from_str::<Value>(t).map_err(|e| EditError::Yaml {
            origin: origin.into(),
            message: e.message,
        })
    };
    let mut want = parse(before)?;
    let got = parse(after)?;
    let unverified = || EditError::Unverified {
        origin: origin.into(),
        name: name.into(),
    };
    let host = want
        .get_mut("hosts")
        .and_then(|h| h.get_mut(index))
        .and_then(Value::as_object_mut)
        .ok_or_else(unverified)?;
    if host.get("name").and_then(Value::as_str) != Some(name) {
        return Err(unverified());
    }
    host.insert("address".into(), Value::String(address.into()));
    if want == got {
        Ok(())
    } else {
        Err(unverified())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INV: &str = "\
cluster: demo
hosts:
  - name: pg1
    address: 10.0.0.1   # the first
    roles: [postgres]
  - name: pg2
    address: \"10.0.0.2\"
    roles: [postgres]
postgresql:
  version: 15
";

    #[test]
    fn the_named_hosts_address_changes_and_nothing_else() {
        let out = set_host_address(INV, "inv.yml", "pg1", "10.0.0.9").unwrap();
        assert_eq!(out, INV.replace("10.0.0.1   #", "10.0.0.9   #"));
        let out = set_host_address(INV, "inv.yml", "pg2", "10.0.0.9").unwrap();
        assert_eq!(out, INV.replace("\"10.0.0.2\"", "\"10.0.0.9\""));
    }

    #[test]
    fn an_address_already_set_leaves_the_text_as_it_is() {
        assert_eq!(
            set_host_address(INV, "inv.yml", "pg1", "10.0.0.1").unwrap(),
            INV
        );
    }

    #[test]
    fn unindented_items_and_name_after_address_are_found() {
        let t = "hosts:\n- address: a.example\n  name: x\n- address: b.example\n  name: y\n";
        assert_eq!(
            set_host_address(t, "i", "y", "fd00::7").unwrap(),
            "hosts:\n- address: a.example\n  name: x\n- address: fd00::7\n  name: y\n"
        );
    }

    #[test]
    fn refusals_say_what_and_where() {
        let flow = "hosts:\n  - {name: pg1, address: 10.0.0.1}\n";
        assert_eq!(
            set_host_address(flow, "i.yml", "pg1", "10.0.0.2"),
            Err(EditError::NotBlockStyle {
                origin: "i.yml".into(),
                name: "pg1".into(),
            })
        );
        assert_eq!(
            set_host_address(
                "hosts:\n  - name: pg1\n    roles: []\n",
                "i.yml",
                "pg1",
                "10.0.0.2"
            ),
            Err(EditError::NoAddressLine {
                origin: "i.yml".into(),
                name: "pg1".into(),
                line: 2
            })
        );
        assert_eq!(
            set_host_address(INV, "i.yml", "pg7", "10.0.0.2"),
            Err(EditError::NoSuchHost {
                origin: "i.yml".into(),
                name: "pg7".into()
            })
        );
        assert!(matches!(
            set_host_address("cluster: x\n", "i.yml", "pg1", "10.0.0.2"),
            Err(EditError::NoHosts { .. })
        ));
        for bad in ["", "10.0.0.1 # x", "a: b", "-x", "10.0.0.1\nroles: []"] {
            assert!(
                matches!(
                    set_host_address(INV, "i.yml", "pg1", bad),
                    Err(EditError::BadAddress { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_key_of_a_nested_map_is_not_taken_for_the_hosts_own() {
        // `address:` under a nested key is deeper than the item's fields: not the host's.
        let t = "hosts:\n  - name: pg1\n    ssh:\n      address: 1.1.1.1\n";
        assert!(matches!(
            set_host_address(t, "i", "pg1", "10.0.0.2"),
            Err(EditError::NoAddressLine { .. })
        ));
    }
}
