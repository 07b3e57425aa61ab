//! Chat templates: Hugging Face Jinja templates rendered with minijinja the
//! way `transformers` renders them (trim_blocks, lstrip_blocks, loop
//! controls, `raise_exception`, `strftime_now`, a `tojson` that prints like
//! Python's `json.dumps(..., ensure_ascii=False)`, Python string and dict
//! methods).
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

use lmspec_engine::error::{Error, Result};

/// Everything a template sees besides the messages.
#[derive(Debug, Clone, Default)]
pub struct ChatContext {
    pub tools: Option<serde_json::Value>,
    pub add_generation_prompt: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Extra variables, e.g. `enable_thinking`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A parsed chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
}

const NAME: &str = "chat";

fn template_error(source: &Path, e: &minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    if e.kind() == ErrorKind::OutOfFuel {
        msg.push_str(" (the template ran longer than LMSPEC_TEMPLATE_FUEL allows)");
    }
    Error::Template {
        file: source.to_path_buf(),
        msg,
    }
}

impl ChatTemplate {
    /// Parses `text`; `source` names where it came from in errors.
    pub fn new(text: &str, source: &Path) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_methods);
        // Bounded work per render: a template that loops without end runs
        // out of fuel instead of hanging.
        let fuel = lmspec_spec::limits::limits()?.template_fuel;
        env.set_fuel(Some(fuel));
        env.add_template_owned(NAME, text.to_string())
            .map_err(|e| template_error(source, &e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
        })
    }

    /// Renders `messages` (a JSON list of `{role, content, ...}`).
    pub fn render(&self, messages: &serde_json::Value, ctx: &ChatContext) -> Result<String> {
        let mut vars = serde_json::Map::new();
        vars.insert("messages".into(), messages.clone());
        if let Some(t) = &ctx.tools {
            vars.insert("tools".into(), t.clone());
        }
        vars.insert(
            "add_generation_prompt".into(),
            ctx.add_generation_prompt.into(),
        );
        if let Some(b) = &ctx.bos_token {
            vars.insert("bos_token".into(), b.clone().into());
        }
        if let Some(e) = &ctx.eos_token {
            vars.insert("eos_token".into(), e.clone().into());
        }
        for (k, v) in &ctx.extra {
            vars.insert(k.clone(), v.clone());
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.source, &e))?;
        tmpl.render(Value::from_serialize(&vars))
            .map_err(|e| template_error(&self.source, &e))
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// `strftime` for a UTC time in seconds since the epoch (common directives).
pub fn strftime(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => out.push_str(&format!("%-{o}")),
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

/// Python `json.dumps(x, ensure_ascii=False, indent=indent)`.
pub fn python_json(v: &serde_json::Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_json(v, indent, 0, &mut out);
    out
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        serde_json::Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (k, (key, item)) in map.iter().enumerate() {
                if k > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        serde_json::Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.fract() == 0.0 && x.abs() < 1e16 {
                out.push_str(&format!("{x:.1}"));
            } else {
                out.push_str(&x.to_string());
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Widest indent `tojson` accepts (each level repeats it).
const MAX_INDENT: usize = 64;

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    if let Some(n) = indent.filter(|n| *n > MAX_INDENT) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent {n} is over {MAX_INDENT}"),
        ));
    }
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(python_json(&json, indent))
}

fn str_arg(args: &[Value], k: usize) -> Option<String> {
    args.get(k).and_then(|v| v.as_str()).map(str::to_string)
}

/// Python methods called on template values (`s.strip()`, `d.items()`, ...).
fn python_methods(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || {
        Err(minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method '{method}'", value.kind()),
        ))
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = str_arg(args, 0);
            let set = |c: char| {
                chars
                    .as_deref()
                    .map_or(c.is_whitespace(), |cs| cs.contains(c))
            };
            Ok(match method {
                "strip" => Value::from(s.trim_matches(set)),
                "lstrip" => Value::from(s.trim_start_matches(set)),
                "rstrip" => Value::from(s.trim_end_matches(set)),
                "upper" => Value::from(s.to_uppercase()),
                "lower" => Value::from(s.to_lowercase()),
                "title" => Value::from(
                    s.split(' ')
                        .map(|w| {
                            let mut c = w.chars();
                            match c.next() {
                                Some(f) => {
                                    f.to_uppercase().collect::<String>()
                                        + &c.as_str().to_lowercase()
                                }
                                None => String::new(),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                "capitalize" => {
                    let mut c = s.chars();
                    Value::from(match c.next() {
                        Some(f) => {
                            f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase()
                        }
                        None => String::new(),
                    })
                }
                "startswith" | "endswith" => {
                    let prefixes: Vec<String> = match args.first() {
                        Some(a) if a.kind() == ValueKind::Seq => a
                            .try_iter()?
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect(),
                        _ => str_arg(args, 0).into_iter().collect(),
                    };
                    Value::from(prefixes.iter().any(|p| {
                        if method == "startswith" {
                            s.starts_with(p.as_str())
                        } else {
                            s.ends_with(p.as_str())
                        }
                    }))
                }
                "split" => {
                    let parts: Vec<Value> = match str_arg(args, 0) {
                        Some(sep) => {
                            let max = args
                                .get(1)
                                .and_then(|m| i64::try_from(m.clone()).ok())
                                .unwrap_or(-1);
                            if max < 0 {
                                s.split(sep.as_str()).map(Value::from).collect()
                            } else {
                                s.splitn(max as usize + 1, sep.as_str())
                                    .map(Value::from)
                                    .collect()
                            }
                        }
                        None => s.split_whitespace().map(Value::from).collect(),
                    };
                    Value::from(parts)
                }
                "replace" => match (str_arg(args, 0), str_arg(args, 1)) {
                    (Some(a), Some(b)) => Value::from(s.replace(a.as_str(), &b)),
                    _ => return unknown(),
                },
                "find" => Value::from(
                    str_arg(args, 0)
                        .and_then(|a| s.find(a.as_str()))
                        .map_or(-1, |i| s[..i].chars().count() as i64),
                ),
                "count" => {
                    Value::from(str_arg(args, 0).map_or(0, |a| s.matches(a.as_str()).count()))
                }
                "join" => match args.first() {
                    Some(items) => {
                        let parts: Vec<String> = items.try_iter()?.map(|x| x.to_string()).collect();
                        Value::from(parts.join(s))
                    }
                    None => return unknown(),
                },
                _ => return unknown(),
            })
        }
        ValueKind::Map => match method {
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    out.push(value.get_item(&k)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() || v.is_none() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %B %Y (%a)", t), "29 February 2024 (Thu)");
        assert_eq!(strftime("%-d %b", t), "29 Feb");
    }

    #[test]
    fn json_prints_like_python() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"a": [1, 2.0, "é"], "b": {}}"#).unwrap();
        assert_eq!(python_json(&v, None), r#"{"a": [1, 2.0, "é"], "b": {}}"#);
        assert_eq!(
            python_json(&v, Some(2)),
            "{\n  \"a\": [\n    1,\n    2.0,\n    \"é\"\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn renders_with_python_methods_and_errors_name_the_source() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }}{% if not loop.last %}|{% endif %}{% endfor %}",
            Path::new("t.jinja"),
        )
        .unwrap();
        let msgs = serde_json::json!([{"role": "user", "content": "  hi "}, {"role": "assistant", "content": "yo"}]);
        assert_eq!(
            t.render(&msgs, &ChatContext::default()).unwrap(),
            "USER:hi|ASSISTANT:yo"
        );
        let bad = ChatTemplate::new("{{ raise_exception('nope') }}", Path::new("x.jinja")).unwrap();
        let err = bad
            .render(&msgs, &ChatContext::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x.jinja: chat template:") && err.contains("nope"),
            "{err}"
        );
        let err = ChatTemplate::new("{% for %}", Path::new("y.jinja"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("y.jinja: chat template:"), "{err}");
    }
}
