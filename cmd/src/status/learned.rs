//! The learned-prefetch line under each layer of `shoal status`.

use shoal_config::ByteSize;
use shoal_fuse::layer::LearnState;

use crate::metrics::LearnedLayer;

/// What learned prefetch did for one layer, in a line.
pub fn line(learned: &LearnedLayer) -> String {
    let l = &learned.learning;
    let what = match l.state {
        LearnState::Looking => "looking for a trace".to_owned(),
        LearnState::Recording => "recording a trace (no usable one found)".to_owned(),
        LearnState::Recorded => {
            format!("trace recorded: {} chunks, {}", l.chunks, ByteSize(l.bytes))
        }
        LearnState::Replaying => format!("prefetching a trace from {}", from(&l.peer)),
        LearnState::Replayed => format!(
            "trace used (from {}): prefetched {} chunks, {}",
            from(&l.peer),
            l.chunks,
            ByteSize(l.bytes)
        ),
    };
    let why = if l.reason.is_empty() {
        String::new()
    } else {
        format!("; {}", l.reason)
    };
    format!("learned prefetch: {what} for image {}{why}", l.image)
}

fn from(peer: &str) -> &str {
    if peer.is_empty() {
        "this node"
    } else {
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_fuse::layer::LayerLearning;

    #[test]
    fn says_whether_a_trace_was_recorded_or_used_and_how_much() {
        let mut learned = LearnedLayer {
            digest: "sha256:ab".into(),
            learning: LayerLearning {
                image: "sha256:cd".into(),
                state: LearnState::Replayed,
                chunks: 12,
                bytes: 3 << 20,
                peer: "127.0.0.2:7420".into(),
                reason: String::new(),
            },
        };
        assert_eq!(
            line(&learned),
            "learned prefetch: trace used (from 127.0.0.2:7420): prefetched 12 chunks, 3.0 MiB \
             for image sha256:cd"
        );
        learned.learning.state = LearnState::Recorded;
        learned.learning.reason = "a trace from this node was rejected: bad magic".into();
        assert!(line(&learned).starts_with("learned prefetch: trace recorded: 12 chunks"));
        assert!(line(&learned).ends_with("; a trace from this node was rejected: bad magic"));
    }
}
