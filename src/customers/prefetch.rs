//! The one prefetch helper of the customer store: the index asks for the
//! line where a probe begins, the table for a record (which may span three
//! lines) and its wake-up mark. With a million customers, waiting for
//! memory is most of the cost of an event; these hints let a batch load
//! the next customers while it scores the current ones.

/// Asks the CPU to bring `words` into the cache: every cache line they
/// touch. Only a hint: it neither reads nor writes memory.
#[inline]
pub fn prefetch_lines<T>(words: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // Every cache line the words touch: a record need not start at a
        // line, so 30 words can span three lines, not two.
        let base = words.as_ptr().cast::<i8>();
        let misalign = base as usize & 63;
        let first = base.wrapping_sub(misalign);
        let mut offset = 0;
        while offset < misalign + std::mem::size_of_val(words) {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch
            // neither reads nor writes memory (any address is allowed).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = words;
}
