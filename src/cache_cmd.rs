//! `lmspec cache-prompt`: process a prompt once and save its cache (the
//! layout of mlx-lm's `cache_prompt`), and the continuation rule `generate
//! --prompt-cache` applies to the prompt that follows it.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::GenArgs;

/// Marks where the final message's content goes when a template is rendered
/// to find what the cached prompt leaves off.
const QUERY: &str = "<query>";

#[derive(Debug, clap::Args)]
pub(crate) struct CachePromptArgs {
    #[command(flatten)]
    pub(crate) gen: GenArgs,
    /// The prompt (a user message whose turn stays open unless --raw).
    #[arg(long, short)]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Where to write the cache (a .safetensors file).
    #[arg(long)]
    out: PathBuf,
}

/// Token ids of `prompt` for a cache: with the chat template, a user
/// message (after `system`) whose turn is left open, as mlx-lm's
/// `continue_final_message` leaves it, so that a later prompt continues it.
fn open_turn_ids(
    lm: &lmspec::lm::LanguageModel,
    system: Option<&str>,
    prompt: &str,
) -> Result<Vec<u32>> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": format!("{prompt}{QUERY}")}));
    let ctx = lmspec::lm::template::ChatContext::default();
    let text = lm.render(&serde_json::Value::Array(messages), &ctx)?;
    let Some(end) = text.rfind(QUERY) else {
        bail!("the chat template drops the message text; use --raw");
    };
    Ok(lm.tokenizer.encode(&text[..end])?)
}

pub(crate) fn cache_prompt(specs: &Option<PathBuf>, args: &CachePromptArgs) -> Result<ExitCode> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}", f.display()))?
        }
        (None, None) => bail!("give the prompt with --prompt or --prompt-file"),
    };
    let lm = args.gen.load(specs)?;
    let ids = if args.raw || lm.template.is_none() {
        lm.tokenizer.encode(&prompt)?
    } else {
        open_turn_ids(&lm, args.gen.system.as_deref(), &prompt)?
    };
    let params = args.gen.params();
    let start = std::time::Instant::now();
    let cache = lm.cache_prompt(&ids, &params, &mut |done, total| {
        eprint!("\rprocessed {done}/{total} tokens");
    })?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "\rprocessed {} tokens in {secs:.2} s ({:.1} tok/s)",
        ids.len(),
        ids.len() as f64 / secs.max(1e-9)
    );
    lm.save_prompt_cache(&args.out, &cache, &ids, &Default::default())?;
    eprintln!("saved {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// The ids to feed after a cached prompt (mlx-lm's rule for `generate
/// --prompt-cache-file`): with the chat template, the rendered prompt from
/// where the user's text starts, so that the new text continues the cached
/// message and the template closes the turn; raw, the text's own ids.
pub(crate) fn continuation_ids(
    lm: &lmspec::lm::LanguageModel,
    context: &lmspec::lm::template::ChatContext,
    prompt: &str,
    raw: bool,
) -> Result<Vec<u32>> {
    if raw || lm.template.is_none() {
        return Ok(lm.tokenizer.tokenize(prompt, false, true)?);
    }
    let render = |content: &str| {
        let messages = serde_json::json!([{"role": "user", "content": content}]);
        lm.render(&messages, context)
    };
    let full = render(prompt)?;
    let probe = render(QUERY)?;
    let Some(at) = probe.find(QUERY) else {
        bail!("the chat template drops the message text; use --raw with --prompt-cache");
    };
    Ok(lm.tokenizer.tokenize(&full[at..], false, true)?)
}

/// Reads `--prompt-cache FILE` for `lm`, saying what it holds.
pub(crate) fn load(
    lm: &lmspec::lm::LanguageModel,
    path: &Path,
) -> Result<lmspec::lm::prompt_cache::PromptCache> {
    let loaded = lm.load_prompt_cache(path)?;
    eprintln!(
        "[prompt cache {}: {} positions]",
        path.display(),
        loaded.cache.offset()
    );
    Ok(loaded)
}
