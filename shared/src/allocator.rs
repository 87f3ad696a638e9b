//! Memory settings of every inkwire binary: [`configure`] is the first thing each `main`
//! does.
//!
//! Why: mimalloc (each binary's global allocator) asks the kernel for transparent huge pages
//! on its arenas (`madvise`), so touched arena memory is backed by 2 MiB pages and resident
//! memory grows in steps far above what is allocated. A server that holds many small things
//! — connections, loaded documents — pays for that: the co-editing benchmark measured
//! 344–403 KiB per loaded document with huge pages and 177 KiB without, at the same
//! throughput. (Redis gives the same advice for the same reason.) So huge pages are turned
//! off for the process (`PR_SET_THP_DISABLE`), unless the operator asks for them with
//! `INKWIRE_TRANSPARENT_HUGE_PAGES=1`.

/// The variable that keeps transparent huge pages on.
pub const THP_ENV: &str = "INKWIRE_TRANSPARENT_HUGE_PAGES";

/// Applies the settings (module doc). Returns whether huge pages were turned off.
pub fn configure() -> bool {
    if std::env::var(THP_ENV).is_ok_and(|v| v.trim() == "1") {
        return false;
    }
    disable_transparent_huge_pages()
}

#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() -> bool {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's memory map; it takes
    // no pointers.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_off_after_configure() {
        if std::env::var(THP_ENV).is_ok_and(|v| v.trim() == "1") {
            return;
        }
        assert!(configure());
        // SAFETY: as above; PR_GET_THP_DISABLE answers the flag.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1);
    }
}
