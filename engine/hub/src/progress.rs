//! Download progress: bars on a terminal, plain lines elsewhere.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How downloads report progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, lines otherwise.
    Auto,
    Bars,
    Lines,
    Quiet,
}

/// Progress of one fetch (several files).
#[derive(Debug)]
pub struct Reporter {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    label: String,
}

impl Reporter {
    /// A fetch of `files` files, `total` bytes (0 when unknown), for `label`.
    pub fn new(mode: ProgressMode, label: &str, files: usize, total: u64) -> Reporter {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let (multi, overall) = if mode == ProgressMode::Bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(total));
            bar.set_style(style("{msg:30} {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} eta {eta:>4} [{bar:30}]"));
            bar.set_message(format!("{label} ({files} files)"));
            (Some(multi), Some(bar))
        } else {
            if mode == ProgressMode::Lines {
                eprintln!(
                    "lmspec: fetching {label}: {files} files, {}",
                    HumanBytes(total)
                );
            }
            (None, None)
        };
        Reporter {
            mode,
            multi,
            overall,
            label: label.to_string(),
        }
    }

    /// The progress of one file, for hf-hub's downloader.
    pub fn file(&self, name: &str) -> FileProgress {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(0));
            bar.set_style(style("  {msg:28} {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} eta {eta:>4} [{bar:30}]"));
            bar.set_message(short(name, 28));
            bar
        });
        FileProgress {
            lines: self.mode == ProgressMode::Lines,
            bar,
            overall: self.overall.clone(),
            name: name.to_string(),
            size: 0,
            done: 0,
            start: Instant::now(),
            last_line: Instant::now(),
            announced: false,
        }
    }

    /// Ends the report with a summary line (lines mode) or clears the bars.
    pub fn finish(&self, fetched: usize, bytes: u64, elapsed: Duration) {
        if let Some(o) = &self.overall {
            o.finish_and_clear();
        }
        if self.mode != ProgressMode::Quiet {
            eprintln!(
                "lmspec: {}: {fetched} files, {} in {:.1} s",
                self.label,
                HumanBytes(bytes),
                elapsed.as_secs_f64()
            );
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn short(name: &str, max: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= max {
        return name.to_string();
    }
    let tail: String = chars[chars.len() - (max - 2)..].iter().collect();
    format!("..{tail}")
}

/// One file's progress (implements hf-hub's `Progress`).
#[derive(Debug)]
pub struct FileProgress {
    lines: bool,
    bar: Option<ProgressBar>,
    overall: Option<ProgressBar>,
    name: String,
    size: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
    announced: bool,
}

/// Seconds between two progress lines of one file.
const LINE_EVERY: Duration = Duration::from_secs(5);

impl hf_hub::api::Progress for FileProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        // hf-hub calls init again when it resumes after a dropped
        // connection; the bytes so far then arrive as one update.
        if let (Some(o), true) = (&self.overall, self.done > 0) {
            o.set_position(o.position().saturating_sub(self.done));
        }
        self.size = size as u64;
        self.done = 0;
        if let Some(b) = &self.bar {
            b.set_length(self.size);
            b.set_position(0);
        }
        if self.lines && !self.announced {
            self.announced = true;
            eprintln!("  {} ({})", self.name, HumanBytes(self.size));
        }
    }

    fn update(&mut self, size: usize) {
        self.done += size as u64;
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
        if let Some(o) = &self.overall {
            o.inc(size as u64);
        }
        if self.lines && self.last_line.elapsed() >= LINE_EVERY && self.size > 0 {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            let rate = self.done as f64 / secs;
            let eta = (self.size.saturating_sub(self.done)) as f64 / rate.max(1.0);
            eprintln!(
                "  {}: {:.0}% of {}, {}/s, eta {:.0} s",
                self.name,
                100.0 * self.done as f64 / self.size as f64,
                HumanBytes(self.size),
                HumanBytes(rate as u64),
                eta
            );
        }
    }

    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
