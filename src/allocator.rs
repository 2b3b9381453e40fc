//! The binary's allocator: mimalloc, on glibc and musl alike.
//!
//! At scale (docs/benchmarks.md, `meshwarden-bench scale`) glibc's malloc spent about a
//! quarter of the operator's CPU in its free lists (`malloc_consolidate`, `unlink_chunk`), even
//! with one arena, and musl's malloc (the static image) is slower still. With mimalloc the
//! same run used about a quarter less CPU. It is set to give memory it no longer uses back to
//! the system at once instead of after a second, and not to commit whole arenas up front, so
//! that the resident size follows what is in use: with its defaults it stayed about twice as
//! high.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_t` values of the vendored mimalloc (libmimalloc-sys 0.1.49, pinned in
/// Cargo.toml; `c_src/mimalloc/v3/include/mimalloc.h`). The crate names only older options.
/// `options_are_the_vendored_ones` checks each one by its vendored default.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the options above; called first in `main`.
pub fn configure() {
    // SAFETY: mi_option_set only stores an option value (an atomic in mimalloc).
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_the_vendored_ones() {
        // The vendored defaults (`src/options.c`): purge delay 1000 ms; eager commit of arenas
        // 2 (only where the system overcommits). Read before `configure` runs in this process.
        // SAFETY: mi_option_get only reads an option value.
        let (delay, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!((delay, eager), (1000, 2));
        configure();
        // SAFETY: as above.
        let set = unsafe {
            (
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!(set, (0, 0));
    }
}
