//! A growable array in a memory mapping of its own, for the large arrays of
//! a customer table: its records, its id arena, its index.
//!
//! A `Vec` grows by allocating a buffer twice the size and copying: for a
//! moment both are resident, and with jemalloc (the process's allocator,
//! see `main.rs`) the old buffer stays resident until jemalloc decays it.
//! At a million customers that made the peak memory of a replay 9% larger
//! than the records (160.8 against 147.7 bytes per customer); the same
//! happens to every array that grows with the table. Here the
//! mapping grows in place where the kernel can, and otherwise moves its
//! pages without copying them (`mremap`), as glibc's `realloc` does for
//! large blocks; and when the array shrinks by a lot (customers forgotten
//! or erased), the pages past its end go back to the kernel.
//!
//! Other systems than Linux get a `Vec` with the same interface.

use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

pub use imp::Mapped;

/// The records of a customer table.
pub type MappedWords = Mapped<u32>;

impl<T: Pod> Deref for Mapped<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod> DerefMut for Mapped<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<T: Pod> Default for Mapped<T> {
    fn default() -> Mapped<T> {
        Mapped::new()
    }
}

impl<T: Pod> std::fmt::Debug for Mapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("len", &self.len()).finish()
    }
}

impl<T: Pod> From<Vec<T>> for Mapped<T> {
    fn from(v: Vec<T>) -> Mapped<T> {
        let mut m = Mapped::new();
        m.extend_from_slice(&v);
        m
    }
}

impl<T: Pod> Clone for Mapped<T> {
    fn clone(&self) -> Mapped<T> {
        let mut m = Mapped::new();
        m.extend_from_slice(self);
        m
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use bytemuck::Pod;
    use std::marker::PhantomData;
    use std::ptr::NonNull;

    /// Below this size, the memory past the end is not worth a system call.
    const RELEASE_AT_LEAST: usize = 2 << 20;
    /// From this size on, a growing mapping asks for transparent huge pages.
    ///
    /// Why: a lookup lands on a random record, index bucket and wake-up
    /// mark among hundreds of megabytes; with 4 KiB pages each is also a
    /// TLB miss, and under a hypervisor a page walk costs as much as the
    /// miss itself. 2 MiB pages cover a million customers' records with a
    /// hundred TLB entries. Smaller arrays keep small pages: a huge page
    /// is faulted in whole, so the part of the last one past the array's
    /// end costs up to 2 MiB of resident memory; past 32 MiB that is at
    /// most a sixteenth more (a partition of 25k customers would pay half).
    const HUGE_PAGES_FROM: usize = 32 << 20;
    /// The same for an array sized once and filled whole
    /// ([`Mapped::filled_whole`]): nothing lies past its end, so huge
    /// pages cost nothing extra from the first one on.
    const HUGE_PAGES_FROM_FILLED: usize = 4 << 20;

    pub struct Mapped<T: Pod> {
        ptr: NonNull<T>,
        len: usize,
        /// Elements the mapping holds (0: no mapping).
        cap: usize,
        /// Bytes from the start that may be resident: everything up to the
        /// furthest the array has reached since pages were last released.
        touched: usize,
        /// Mapping size from which huge pages are asked for.
        huge_from: usize,
        _owns: PhantomData<T>,
    }

    // SAFETY: the mapping is owned by this value alone, like a Vec's
    // buffer, and `T: Pod` holds no references; `&Mapped` gives shared
    // access only.
    unsafe impl<T: Pod> Send for Mapped<T> {}
    // SAFETY: as above.
    unsafe impl<T: Pod> Sync for Mapped<T> {}

    fn page() -> usize {
        // SAFETY: sysconf has no memory preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
    }

    fn round_up(bytes: usize, page: usize) -> usize {
        bytes.div_ceil(page) * page
    }

    impl<T: Pod> Mapped<T> {
        const SIZE: usize = std::mem::size_of::<T>();

        pub const fn new() -> Mapped<T> {
            Mapped {
                ptr: NonNull::dangling(),
                len: 0,
                cap: 0,
                touched: 0,
                huge_from: HUGE_PAGES_FROM,
                _owns: PhantomData,
            }
        }

        /// An array that will be sized once and filled whole (as an index's
        /// buckets are): it asks for huge pages from a smaller size.
        pub const fn filled_whole() -> Mapped<T> {
            let mut m = Mapped::new();
            m.huge_from = HUGE_PAGES_FROM_FILLED;
            m
        }

        pub fn len(&self) -> usize {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        pub fn as_slice(&self) -> &[T] {
            // SAFETY: `ptr` is valid for `len` initialised elements (or
            // dangling and aligned with `len` 0).
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }

        pub fn as_mut_slice(&mut self) -> &mut [T] {
            // SAFETY: as in `as_slice`, and `&mut self` is exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }

        /// Makes room for at least `need` elements: at least doubles.
        fn grow(&mut self, need: usize) {
            let page = page();
            let want = need.max(self.cap.saturating_mul(2)).max(page / Self::SIZE);
            let bytes = want
                .checked_mul(Self::SIZE)
                .map(|b| round_up(b, page))
                .unwrap_or_else(|| capacity_overflow());
            let old = self.cap * Self::SIZE;
            // SAFETY: a fresh anonymous mapping, or the remapping of the
            // one this value owns, whose size is `old`.
            let p = unsafe {
                if self.cap == 0 {
                    libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                } else {
                    libc::mremap(self.ptr.as_ptr().cast(), old, bytes, libc::MREMAP_MAYMOVE)
                }
            };
            if p == libc::MAP_FAILED {
                out_of_memory(bytes);
            }
            if bytes >= self.huge_from && old < self.huge_from {
                // Only a hint: where transparent huge pages are off or
                // unavailable, the call fails and small pages serve. The
                // flag stays with the mapping through later remaps.
                // SAFETY: `p` is the start of a mapping of `bytes` bytes
                // that this value owns; the advice changes no contents.
                unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
            }
            let Some(ptr) = NonNull::new(p.cast::<T>()) else {
                out_of_memory(bytes);
            };
            self.ptr = ptr;
            self.cap = bytes / Self::SIZE;
        }

        pub fn reserve(&mut self, additional: usize) {
            let need = self
                .len
                .checked_add(additional)
                .unwrap_or_else(|| capacity_overflow());
            if need > self.cap {
                self.grow(need);
            }
        }

        pub fn resize(&mut self, n: usize, value: T) {
            if n > self.len {
                self.reserve(n - self.len);
                // SAFETY: `n <= cap`: the range lies in the mapping.
                unsafe {
                    let tail = std::slice::from_raw_parts_mut(
                        self.ptr.as_ptr().add(self.len),
                        n - self.len,
                    );
                    tail.fill(value);
                }
                self.touched = self.touched.max(n * Self::SIZE);
            }
            self.len = n;
        }

        pub fn truncate(&mut self, n: usize) {
            if n >= self.len {
                return;
            }
            self.len = n;
            let page = page();
            let keep = round_up(n * Self::SIZE, page);
            // Give back the pages past the end once they are many and more
            // than the array itself: a table that lost most of its
            // customers shrinks, one that lost a few keeps its pages.
            if self.touched > keep + RELEASE_AT_LEAST && self.touched > 2 * keep {
                // SAFETY: `keep..touched` lies within the mapping (touched
                // <= its size, both page-aligned after rounding); the
                // elements there are past `len`, so nothing refers to them.
                // MADV_DONTNEED pages read back as zero.
                unsafe {
                    libc::madvise(
                        self.ptr.as_ptr().cast::<u8>().add(keep).cast(),
                        round_up(self.touched, page).min(self.cap * Self::SIZE) - keep,
                        libc::MADV_DONTNEED,
                    );
                }
                self.touched = keep;
            }
        }

        pub fn extend_from_slice(&mut self, s: &[T]) {
            self.reserve(s.len());
            // SAFETY: room for `s.len()` more elements was just made; a
            // slice of another value cannot overlap this mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), self.ptr.as_ptr().add(self.len), s.len());
            }
            self.len += s.len();
            self.touched = self.touched.max(self.len * Self::SIZE);
        }
    }

    impl<T: Pod> Drop for Mapped<T> {
        fn drop(&mut self) {
            if self.cap > 0 {
                // SAFETY: the mapping is this value's and is not used after.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap * Self::SIZE) };
            }
        }
    }

    fn capacity_overflow() -> ! {
        panic!("customer table larger than the address space")
    }

    fn out_of_memory(bytes: usize) -> ! {
        // As a Vec does when its allocation fails.
        std::alloc::handle_alloc_error(
            std::alloc::Layout::from_size_align(bytes, 4096)
                .unwrap_or(std::alloc::Layout::new::<u32>()),
        )
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use bytemuck::Pod;

    pub struct Mapped<T: Pod>(Vec<T>);

    impl<T: Pod> Mapped<T> {
        pub const fn new() -> Mapped<T> {
            Mapped(Vec::new())
        }
        pub const fn filled_whole() -> Mapped<T> {
            Mapped(Vec::new())
        }
        pub fn len(&self) -> usize {
            self.0.len()
        }
        pub fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        pub fn as_slice(&self) -> &[T] {
            &self.0
        }
        pub fn as_mut_slice(&mut self) -> &mut [T] {
            &mut self.0
        }
        pub fn reserve(&mut self, additional: usize) {
            self.0.reserve(additional)
        }
        pub fn resize(&mut self, n: usize, value: T) {
            self.0.resize(n, value)
        }
        pub fn truncate(&mut self, n: usize) {
            self.0.truncate(n)
        }
        pub fn extend_from_slice(&mut self, s: &[T]) {
            self.0.extend_from_slice(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Mapped, MappedWords};

    #[test]
    fn bytes_grow_like_a_vec() {
        let mut m: Mapped<u8> = Mapped::new();
        let mut v = Vec::new();
        for i in 0..100_000u32 {
            m.extend_from_slice(&i.to_le_bytes()[..(i % 4) as usize]);
            v.extend_from_slice(&i.to_le_bytes()[..(i % 4) as usize]);
        }
        assert_eq!(&m[..], &v[..]);
        m.truncate(0);
        assert!(m.is_empty());
    }

    #[test]
    fn grows_keeps_and_shrinks_like_a_vec() {
        let mut m = MappedWords::new();
        let mut v: Vec<u32> = Vec::new();
        assert!(m.is_empty());
        // Through several remappings, past the release threshold.
        for i in 0..3_000_000u32 {
            if i % 7 == 0 {
                m.resize(m.len() + 3, i);
                v.resize(v.len() + 3, i);
            } else {
                m.extend_from_slice(&[i, i ^ 0xffff]);
                v.extend_from_slice(&[i, i ^ 0xffff]);
            }
        }
        assert_eq!(&m[..], &v[..]);
        m[5] = 42;
        v[5] = 42;
        m.copy_within(10..20, 0);
        v.copy_within(10..20, 0);
        assert_eq!(&m[..], &v[..]);
        // A big shrink releases the tail; growing again reads what was
        // written, not what was there before.
        m.truncate(1000);
        v.truncate(1000);
        assert_eq!(&m[..], &v[..]);
        m.resize(2_000_000, 7);
        v.resize(2_000_000, 7);
        assert_eq!(&m[..], &v[..]);
        let c = m.clone();
        assert_eq!(&c[..], &v[..]);
        assert_eq!(&MappedWords::from(v.clone())[..], &v[..]);
    }
}
