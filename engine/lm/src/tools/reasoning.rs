//! Reasoning blocks (`<think>...</think>` or a template's own markers) split
//! out of generated text as it streams, including when the prompt already
//! opened the block.
use super::partial_suffix;

/// A piece of output: answer text or reasoning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    Text(String),
    Reasoning(String),
}

/// Splits streamed text into answer and reasoning spans.
#[derive(Debug)]
pub struct ReasoningSplitter {
    open: String,
    close: String,
    inside: bool,
    buf: String,
}

impl ReasoningSplitter {
    /// `starts_inside`: the prompt ended with the open marker.
    pub fn new(open: &str, close: &str, starts_inside: bool) -> ReasoningSplitter {
        ReasoningSplitter {
            open: open.to_string(),
            close: close.to_string(),
            inside: starts_inside,
            buf: String::new(),
        }
    }

    /// `<think>` / `</think>`, inside when `prompt` ends with `<think>`.
    pub fn think(prompt: &str) -> ReasoningSplitter {
        ReasoningSplitter::new(
            "<think>",
            "</think>",
            prompt.trim_end().ends_with("<think>"),
        )
    }

    fn emit(&self, text: &str, out: &mut Vec<Span>) {
        if text.is_empty() {
            return;
        }
        match (out.last_mut(), self.inside) {
            (Some(Span::Reasoning(r)), true) => r.push_str(text),
            (Some(Span::Text(t)), false) => t.push_str(text),
            (_, true) => out.push(Span::Reasoning(text.to_string())),
            (_, false) => out.push(Span::Text(text.to_string())),
        }
    }

    pub fn push(&mut self, chunk: &str) -> Vec<Span> {
        self.buf.push_str(chunk);
        let mut out = Vec::new();
        loop {
            let marker = if self.inside {
                self.close.clone()
            } else {
                self.open.clone()
            };
            if let Some(pos) = self.buf.find(marker.as_str()) {
                let before = self.buf[..pos].to_string();
                self.emit(&before, &mut out);
                self.buf.drain(..pos + marker.len());
                self.inside = !self.inside;
                continue;
            }
            let cut = self.buf.len() - partial_suffix(&self.buf, &marker);
            let text = self.buf[..cut].to_string();
            self.emit(&text, &mut out);
            self.buf.drain(..cut);
            return out;
        }
    }

    pub fn finish(&mut self) -> Vec<Span> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        self.emit(&rest, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut ReasoningSplitter, chunks: &[&str]) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        let mut merged: Vec<Span> = Vec::new();
        for span in out {
            match (merged.last_mut(), span) {
                (Some(Span::Text(a)), Span::Text(b)) => a.push_str(&b),
                (Some(Span::Reasoning(a)), Span::Reasoning(b)) => a.push_str(&b),
                (_, s) => merged.push(s),
            }
        }
        merged
    }

    #[test]
    fn splits_reasoning_whole_and_by_character() {
        let text = "<think>\nThe user wants Paris.\n</think>\n\nThe capital is Paris.";
        let want = vec![
            Span::Reasoning("\nThe user wants Paris.\n".into()),
            Span::Text("\n\nThe capital is Paris.".into()),
        ];
        assert_eq!(run(&mut ReasoningSplitter::think(""), &[text]), want);
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&mut ReasoningSplitter::think(""), &refs), want);
    }

    #[test]
    fn prompt_that_opened_the_block() {
        let mut s = ReasoningSplitter::think("<|im_start|>assistant\n<think>\n");
        assert_eq!(
            run(&mut s, &["hmm</th", "ink>ok"]),
            vec![Span::Reasoning("hmm".into()), Span::Text("ok".into())]
        );
        let mut s = ReasoningSplitter::new("<|channel>thought", "<channel|>", false);
        assert_eq!(
            run(&mut s, &["a<|channel>thought b<channel|>c"]),
            vec![
                Span::Text("a".into()),
                Span::Reasoning(" b".into()),
                Span::Text("c".into())
            ]
        );
    }
}
