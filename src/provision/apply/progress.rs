//! Per-host progress of a run: indicatif spinners on a TTY, `[host] message` lines otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Per-host progress: indicatif spinners on a TTY, `[host] message` lines otherwise.
#[derive(Clone)]
pub struct Progress {
    mp: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
}

impl Progress {
    pub fn new(hosts: &[String], enabled: bool) -> Progress {
        let mp = MultiProgress::new();
        if !enabled || mp.is_hidden() {
            return Progress {
                mp: None,
                bars: BTreeMap::new(),
            };
        }
        let style = ProgressStyle::with_template("{spinner} {prefix:>12} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = hosts
            .iter()
            .map(|h| {
                let b = mp.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(h.clone());
                b.enable_steady_tick(Duration::from_millis(120));
                (h.clone(), b)
            })
            .collect();
        Progress { mp: Some(mp), bars }
    }

    pub fn msg(&self, host: &str, msg: &str) {
        match (self.mp.is_some(), self.bars.get(host)) {
            (true, Some(b)) => b.set_message(msg.to_string()),
            _ => eprintln!("[{host}] {msg}"),
        }
    }

    pub fn finish(&self) {
        for b in self.bars.values() {
            b.finish_and_clear();
        }
    }
}
