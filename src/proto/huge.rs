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
//! A block that grows past that size (a frame being encoded) moves to a new, advised block:
//! grown in place it would keep its small pages.
//!
//! `starlingd`, `starling` and the Python binding each declare it as their global allocator.
//! The Python kernels get the same from glibc (`glibc.malloc.hugetlb`, set by their engine).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size up ask for huge pages.
pub const HUGE_FROM: usize = 4 << 20;

/// [`System`], with blocks of [`HUGE_FROM`] or more advised to use transparent huge pages.
pub struct HugePages;

// SAFETY: every call is forwarded to `System`, which upholds the contract; `advise` only
// gives the kernel a hint about pages of the block just returned, and never moves or frees it.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
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
        // SAFETY: `ptr` came from `System` (every block here does), with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    /// A block growing to [`HUGE_FROM`] or more moves to a new block, advised before the copy
    /// touches it: glibc would grow it in place (`mremap`), on the small pages it had. A
    /// block that shrinks stays where it is.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size < HUGE_FROM || new_size <= layout.size() {
            // SAFETY: as for `dealloc`; `new_size` is the caller's to check.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, is a valid
        // size, so the new layout is valid; the old block is copied within both sizes, then
        // freed with its own layout.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let p = self.alloc(new_layout);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                System.dealloc(ptr, layout);
            }
            p
        }
    }
}

/// Asks for huge pages on the whole pages of `len` bytes at `p`, if the block is large.
pub fn advise(p: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    if p.is_null() || len < HUGE_FROM {
        return;
    }
    let start = (p as usize).next_multiple_of(PAGE);
    let end = (p as usize + len) & !(PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside a block this process owns; MADV_HUGEPAGE changes no
        // content, and a kernel without it answers EINVAL, which is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
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
    }
}
