//! ces-stream: live customer engagement scores.
