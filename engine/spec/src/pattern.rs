//! Weight-name patterns with captures: `{i}` matches one dotted segment,
//! `{rest*}` any tail.
use indexmap::IndexMap;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Cap { name: String, greedy: bool },
}

/// A compiled name pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    parts: Vec<Part>,
}

impl Pattern {
    pub fn parse(src: &str) -> Result<Pattern, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in pattern '{src}'"))?;
                    let inner = &rest[1..end];
                    let (name, greedy) = match inner.strip_suffix('*') {
                        Some(n) => (n, true),
                        None => (inner, false),
                    };
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!("bad capture '{{{inner}}}' in pattern '{src}'"));
                    }
                    if matches!(parts.last(), Some(Part::Cap { .. })) {
                        return Err(format!("two captures in a row in pattern '{src}'"));
                    }
                    parts.push(Part::Cap {
                        name: name.to_string(),
                        greedy,
                    });
                    rest = &rest[end + 1..];
                }
                Some(k) => {
                    parts.push(Part::Lit(rest[..k].to_string()));
                    rest = &rest[k..];
                }
                None => {
                    parts.push(Part::Lit(rest.to_string()));
                    rest = "";
                }
            }
        }
        if src.contains('}') && !parts.iter().any(|p| matches!(p, Part::Cap { .. })) {
            return Err(format!("stray '}}' in pattern '{src}'"));
        }
        Ok(Pattern { parts })
    }

    /// Captures when `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> Option<IndexMap<String, String>> {
        let mut caps = IndexMap::new();
        match_from(&self.parts, name, &mut caps).then_some(caps)
    }

    /// The capture names, in order.
    pub fn captures(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Cap { name, .. } => Some(name.clone()),
                Part::Lit(_) => None,
            })
            .collect()
    }

    /// Fills the pattern's captures from `caps`.
    pub fn fill(&self, caps: &IndexMap<String, String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Cap { name, .. } => out.push_str(caps.get(name).ok_or_else(|| {
                    format!("capture '{{{name}}}' is not set by the source pattern")
                })?),
            }
        }
        Ok(out)
    }
}

fn match_from(parts: &[Part], s: &str, caps: &mut IndexMap<String, String>) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return s.is_empty();
    };
    match first {
        Part::Lit(l) => s
            .strip_prefix(l.as_str())
            .is_some_and(|t| match_from(rest, t, caps)),
        Part::Cap { name, greedy } => {
            let limit = if *greedy {
                s.len()
            } else {
                s.find('.').unwrap_or(s.len())
            };
            for end in (1..=limit).rev() {
                if !s.is_char_boundary(end) {
                    continue;
                }
                if match_from(rest, &s[end..], caps) {
                    caps.insert(name.clone(), s[..end].to_string());
                    return true;
                }
            }
            false
        }
    }
}
