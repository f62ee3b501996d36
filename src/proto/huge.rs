//! The allocator of starling's processes: the system's, with large blocks on transparent huge
//! pages.
//!
//! A 100 MB value crosses every process on its way (client, controller, engine) in buffers
//! allocated for it. Faulting such a buffer in 4 KiB pages cost more than copying it; on
//! 2 MiB pages the same buffer takes 512 times fewer faults. The kernel grants huge pages to
//! memory that asks for them (`madvise`, what most distributions' default `madvise` mode of
//! transparent huge pages honours), so blocks from [`HUGE_FROM`] up ask for them, before
//! anything touches them. Smaller blocks, and everything else, are the system allocator's
//! as they were.
//!
//! A block that grows past that size (a read buffer making room for a frame) moves to a new,
//! advised block: grown in place it would keep its small pages.
//!
//! A fresh block costs the kernel's zeroing of every page of it, and a 100 MB value needs one
//! at every hop, every time: measured, that was a third of the controller's time per pull.
//! So a few freed large blocks are kept ([`Kept`]) for the next large allocation that fits
//! them, their pages marked `MADV_FREE`: reused, they are not faulted in or zeroed again,
//! while the kernel may still take them back whenever it runs short of memory. A block kept
//! longer than [`KEEP_FOR`] is given back at the next large allocation or free.
//!
//! `starlingd`, `starling` and the Python binding each declare it as their global allocator.
//! The Python kernels get the same from glibc (`glibc.malloc.hugetlb`, set by their engine).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Blocks from this size up ask for huge pages.
pub const HUGE_FROM: usize = 4 << 20;

/// How many freed large blocks are kept for reuse, at most.
const KEEP_BLOCKS: usize = 8;
/// How many bytes of them, at most.
const KEEP_BYTES: usize = 1 << 30;
/// How long a kept block waits for reuse before it is given back.
const KEEP_FOR: Duration = Duration::from_secs(10);

/// A freed block of `size` usable bytes, kept since `since`.
#[derive(Clone, Copy)]
struct Block {
    at: usize,
    size: usize,
    since: Instant,
}

/// Freed large blocks, kept for reuse (see the module's text). A fixed array: the allocator
/// cannot allocate to remember what it freed.
struct Kept {
    blocks: [Option<Block>; KEEP_BLOCKS],
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    blocks: [None; KEEP_BLOCKS],
});

impl Kept {
    /// Takes the smallest kept block that holds `size` bytes at alignment `align` without
    /// wasting more than its size again.
    fn take(&mut self, size: usize, align: usize) -> Option<Block> {
        let fits = |b: &Block| b.size >= size && b.size <= 2 * size && b.at % align == 0;
        let best = (0..KEEP_BLOCKS)
            .filter(|&i| self.blocks[i].as_ref().is_some_and(fits))
            .min_by_key(|&i| self.blocks[i].map_or(usize::MAX, |b| b.size))?;
        self.blocks[best].take()
    }

    /// Keeps `block` if it fits within the bounds, putting out the oldest ones to make room
    /// and those kept too long; returns what is put out, to be freed (up to all the blocks and
    /// the new one).
    fn keep(&mut self, block: Option<Block>, now: Instant) -> [Option<Block>; KEEP_BLOCKS + 1] {
        let mut out = [None; KEEP_BLOCKS + 1];
        let mut n = 0;
        for slot in &mut self.blocks {
            if slot.is_some_and(|b| now.duration_since(b.since) > KEEP_FOR) {
                out[n] = slot.take();
                n += 1;
            }
        }
        let Some(block) = block else {
            return out;
        };
        if block.size > KEEP_BYTES {
            out[n] = Some(block);
            return out;
        }
        loop {
            let held: usize = self.blocks.iter().flatten().map(|b| b.size).sum();
            let free = self.blocks.iter().position(Option::is_none);
            if let (Some(i), true) = (free, held + block.size <= KEEP_BYTES) {
                self.blocks[i] = Some(block);
                return out;
            }
            let oldest = (0..KEEP_BLOCKS)
                .filter(|&i| self.blocks[i].is_some())
                .min_by_key(|&i| self.blocks[i].map(|b| b.since))
                .expect("full, so not empty");
            out[n] = self.blocks[oldest].take();
            n += 1;
        }
    }
}

/// Frees blocks [`Kept::keep`] put out.
fn free_all(blocks: &[Option<Block>]) {
    for b in blocks.iter().flatten() {
        // SAFETY: a kept block came from `malloc` (through `System`) and was freed by its
        // owner; nothing else refers to it.
        unsafe { libc::free(b.at as *mut libc::c_void) }
    }
}

/// [`System`], with blocks of [`HUGE_FROM`] or more advised to use transparent huge pages.
pub struct HugePages;

// SAFETY: every call is forwarded to `System`, which upholds the contract; `advise` only
// gives the kernel a hint about pages of the block just returned, and never moves or frees it.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE_FROM {
            let now = Instant::now();
            // `try_lock`: a busy list is passed by, never waited for (nor, after a `fork`,
            // held for ever by a thread that is gone).
            let (reused, old) = match KEPT.try_lock() {
                Ok(mut kept) => (
                    kept.take(layout.size(), layout.align()),
                    kept.keep(None, now),
                ),
                Err(_) => (None, [None; KEEP_BLOCKS + 1]),
            };
            free_all(&old);
            if let Some(b) = reused {
                return b.at as *mut u8;
            }
        }
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` has too.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= HUGE_FROM {
            // SAFETY: `ptr` is a live block from `malloc` (`System` allocates with it or
            // `posix_memalign`, whose blocks `malloc_usable_size` and `free` take too).
            let size = unsafe { libc::malloc_usable_size(ptr.cast()) };
            lazy_free(ptr, size);
            let block = Block {
                at: ptr as usize,
                size,
                since: Instant::now(),
            };
            if let Ok(mut kept) = KEPT.try_lock() {
                let out = kept.keep(Some(block), block.since);
                drop(kept);
                free_all(&out);
                return;
            }
        }
        // SAFETY: `ptr` came from `System` (every block here does), with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    /// A block growing to [`HUGE_FROM`] or more moves to a new block, advised before the copy
    /// touches it: glibc would grow it in place (`mremap`), on the small pages it had. A
    /// large block that already holds the new size (a kept one, larger than asked for) and a
    /// block that shrinks stay where they are; a large block moved from is kept.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size < HUGE_FROM || new_size <= layout.size() {
            // SAFETY: as for `dealloc`; `new_size` is the caller's to check.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `ptr` is a live block from `malloc` (see `dealloc`).
        if layout.size() >= HUGE_FROM && unsafe { libc::malloc_usable_size(ptr.cast()) } >= new_size
        {
            return ptr;
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, is a valid
        // size, so the new layout is valid; the old block is copied within both sizes, then
        // freed with its own layout.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let p = self.alloc(new_layout);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}

/// Asks for huge pages on the whole pages of `len` bytes at `p`, if the block is large.
pub fn advise(p: *mut u8, len: usize) {
    if p.is_null() || len < HUGE_FROM {
        return;
    }
    // SAFETY: the range lies inside a block this process owns; MADV_HUGEPAGE changes no
    // content, and a kernel without it answers EINVAL, which is ignored.
    unsafe { madvise_pages(p as usize, len, libc::MADV_HUGEPAGE) }
}

/// Lets the kernel take back the whole pages of a freed block whenever it needs them
/// (`MADV_FREE`): until it does, they stay in place, and reusing them costs nothing.
fn lazy_free(p: *mut u8, len: usize) {
    // SAFETY: the block is this allocator's and no longer in use: its content may go.
    unsafe { madvise_pages(p as usize, len, libc::MADV_FREE) }
}

/// `madvise` on the whole pages within `len` bytes at address `at`.
///
/// # Safety
/// The range must lie in a block this process owns, and `advice` must suit its use.
unsafe fn madvise_pages(at: usize, len: usize, advice: libc::c_int) {
    const PAGE: usize = 4096;
    let start = at.next_multiple_of(PAGE);
    let end = (at + len) & !(PAGE - 1);
    if end > start {
        // SAFETY: as the caller guarantees.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, advice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_ask_for_huge_pages_and_keep_their_contents() {
        let layout = Layout::from_size_align(HUGE_FROM * 2, 64).unwrap();
        // SAFETY: a non-zero layout; the block is written within bounds, then freed.
        unsafe {
            let p = HugePages.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(*p.add(HUGE_FROM), 0);
            p.add(HUGE_FROM).write(7);
            let q = HugePages.realloc(p, layout, HUGE_FROM * 3);
            assert_eq!(*q.add(HUGE_FROM), 7);
            // The mapping says it asked (where the kernel has transparent huge pages).
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
            if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
                let marked = smaps
                    .lines()
                    .any(|l| l.starts_with("VmFlags:") && l.contains(" hg"));
                assert!(marked, "no mapping is marked for huge pages");
            }
            HugePages.dealloc(q, Layout::from_size_align(HUGE_FROM * 3, 64).unwrap());
        }
        // (One test: the blocks kept are the process's, shared with any other test here.)
        freed_large_blocks_are_reused_while_the_kernel_may_take_their_pages();
    }

    fn freed_large_blocks_are_reused_while_the_kernel_may_take_their_pages() {
        let layout = Layout::from_size_align(HUGE_FROM * 2, 16).unwrap();
        // SAFETY: non-zero layouts; blocks are written within bounds and freed once each.
        unsafe {
            let p = HugePages.alloc(layout);
            p.write_bytes(1, layout.size());
            HugePages.dealloc(p, layout);
            let again = HugePages.alloc(layout);
            assert_eq!(again, p, "the freed block is the next one of its size");
            // Whatever the kernel did with its pages, it is a whole, writable block.
            again.write_bytes(2, layout.size());
            assert_eq!(*again.add(layout.size() - 1), 2);
            // A request it would hold with more than its own size to spare gets another.
            let small = Layout::from_size_align(HUGE_FROM, 16).unwrap();
            HugePages.dealloc(again, layout);
            let other = HugePages.alloc(small);
            assert_ne!(other, p, "a block over twice the size is not handed out");
            HugePages.dealloc(other, small);
            // One larger than what is kept is never kept: it goes back at once.
            let huge = Layout::from_size_align(KEEP_BYTES + 1, 16).unwrap();
            let h = HugePages.alloc(huge);
            assert!(!h.is_null());
            HugePages.dealloc(h, huge);
            // A block that already holds more grows in place; one moved from is kept.
            let a = HugePages.alloc(layout);
            assert_eq!(a, p, "the freed block again");
            a.write(9);
            let grown = HugePages.realloc(a, layout, layout.size() + 1);
            assert_eq!(grown, a, "its last page had room");
            let larger = Layout::from_size_align(layout.size() + 1, 16).unwrap();
            let moved = HugePages.realloc(grown, larger, layout.size() * 3);
            assert_ne!(moved, a);
            assert_eq!(*moved, 9, "moved with its contents");
            assert_eq!(HugePages.alloc(layout), a, "the block moved from was kept");
            HugePages.dealloc(a, layout);
            HugePages.dealloc(
                moved,
                Layout::from_size_align(layout.size() * 3, 16).unwrap(),
            );
            let kept = KEPT.lock().unwrap();
            assert!(kept.blocks.iter().flatten().all(|b| b.at != h as usize));
            assert!(kept.blocks.iter().flatten().map(|b| b.size).sum::<usize>() <= KEEP_BYTES);
        }
    }
}
