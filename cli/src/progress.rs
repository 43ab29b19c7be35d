//! Progress bars on stderr, shown only when stderr is a terminal.

use convoy_chunker::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting bar with throughput; hidden when stderr is not a terminal.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn bytes(message: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(message.to_string());
        Self(bar)
    }

    /// A spinner with the time elapsed, for a wait of unknown length.
    pub fn spinner(message: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("the template is valid"),
        );
        bar.set_message(message.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Self(bar)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// A bar counting items (targets staged), with a free-form message.
pub struct CountBar(ProgressBar);

impl Bar {
    pub fn count(message: &str) -> CountBar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} {elapsed}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(message.to_string());
        CountBar(bar)
    }
}

impl CountBar {
    pub fn show(&self, pos: u64, len: u64, message: &str) {
        self.0.set_length(len);
        self.0.set_position(pos);
        self.0.set_message(message.to_string());
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
