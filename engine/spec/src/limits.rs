//! Resource limits on what input may ask for: checked before anything is
//! unrolled, allocated or rendered, so a hostile file or argument gets an
//! error instead of a hang or an abort. Each has a default and an
//! environment variable that overrides it (docs/reliability.md lists them).
use std::sync::OnceLock;

/// The limits in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most layers a spec may unroll (`LMSPEC_MAX_LAYERS`).
    pub max_layers: u64,
    /// Most operations a chat template may run per render
    /// (`LMSPEC_TEMPLATE_FUEL`).
    pub template_fuel: u64,
    /// Longest line read from standard input, in bytes
    /// (`LMSPEC_MAX_LINE_BYTES`).
    pub max_line_bytes: u64,
    /// Longest prompt in tokens; by default the model's declared context
    /// (`LMSPEC_MAX_PROMPT_TOKENS`).
    pub max_prompt_tokens: Option<u64>,
    /// Largest header of a checkpoint file in bytes
    /// (`LMSPEC_MAX_HEADER_BYTES`).
    pub max_header_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_layers: 1024,
            template_fuel: 50_000_000,
            max_line_bytes: 256 << 10,
            max_prompt_tokens: None,
            max_header_bytes: 256 << 20,
        }
    }
}

/// Every limit: its variable and what it bounds, for errors and docs.
pub const VARIABLES: [(&str, &str); 5] = [
    ("LMSPEC_MAX_LAYERS", "layers a spec may unroll"),
    (
        "LMSPEC_TEMPLATE_FUEL",
        "operations per chat-template render",
    ),
    (
        "LMSPEC_MAX_LINE_BYTES",
        "bytes in one line of standard input",
    ),
    (
        "LMSPEC_MAX_PROMPT_TOKENS",
        "prompt tokens (default: the model's context)",
    ),
    (
        "LMSPEC_MAX_HEADER_BYTES",
        "bytes of a checkpoint file's header",
    ),
];

impl Limits {
    /// The defaults with the environment's overrides; an override that is
    /// not a positive integer is an error naming its variable.
    pub fn from_env() -> Result<Limits, String> {
        Limits::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`Limits::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
        let read = |key: &str| -> Result<Option<u64>, String> {
            match get(key) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => Err(format!("{key}={v:?}: expected a positive integer")),
                },
            }
        };
        let d = Limits::default();
        Ok(Limits {
            max_layers: read("LMSPEC_MAX_LAYERS")?.unwrap_or(d.max_layers),
            template_fuel: read("LMSPEC_TEMPLATE_FUEL")?.unwrap_or(d.template_fuel),
            max_line_bytes: read("LMSPEC_MAX_LINE_BYTES")?.unwrap_or(d.max_line_bytes),
            max_prompt_tokens: read("LMSPEC_MAX_PROMPT_TOKENS")?,
            max_header_bytes: read("LMSPEC_MAX_HEADER_BYTES")?.unwrap_or(d.max_header_bytes),
        })
    }
}

/// The process's limits, read from the environment once.
pub fn limits() -> Result<&'static Limits, crate::Error> {
    static LIMITS: OnceLock<Result<Limits, String>> = OnceLock::new();
    LIMITS
        .get_or_init(Limits::from_env)
        .as_ref()
        .map_err(|e| crate::Error::Usage(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_bad_values() {
        let l = Limits::from_lookup(|k| (k == "LMSPEC_MAX_LAYERS").then(|| "7".to_string()));
        assert_eq!(l.map(|l| l.max_layers), Ok(7));
        for bad in ["many", "0", "-3", ""] {
            let e = Limits::from_lookup(|k| (k == "LMSPEC_TEMPLATE_FUEL").then(|| bad.to_string()))
                .unwrap_err();
            assert!(e.starts_with("LMSPEC_TEMPLATE_FUEL="), "{e}");
        }
        assert_eq!(Limits::from_lookup(|_| None), Ok(Limits::default()));
    }
}
