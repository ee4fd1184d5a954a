//! Squash: any range of a stack's layers as one layer with the same union view.
//!
//! Invariants: for a stack `s` and a range `start..stop`, the squashed layer is the changeset
//! from the view of `s[..start]` to the view of `s[..stop]` ([`crate::diff::diff_indices`]), so
//! `view(s[..start] + squash) == view(s[..stop])`. Hence: a squash from the bottom has no
//! whiteouts; a whiteout in the range that hides nothing below is dropped; a directory deleted
//! and recreated inside the range becomes an opaque marker; a hard link whose target a later
//! layer hid or replaced becomes a regular file with the content it showed. The result depends
//! only on the two views, so squashing the same range again (or after a re-import) gives the same
//! `diff_id`. Content is streamed from the packs chunk by chunk; memory holds the entry lists only.

use crate::cas::FreshChunks;
use crate::changeset::{clamp_mtimes, Change};
use crate::diff::diff_indices;
use crate::emit::Tee;
use crate::error::{Error, Result};
use crate::stack::Stack;
use crate::store::{Imported, Progress, Store};
use crate::union::Index;

impl Store {
    /// The index of the stack's bottom `n` layers (the stack's own when `n` is its depth).
    fn prefix_index(&self, stack: &Stack, n: usize) -> Result<Index> {
        if n == stack.depth() {
            return Ok(stack.index.clone());
        }
        if n == 0 {
            return Ok(Index::default());
        }
        Ok(self.stack(&stack.layers[..n])?.index)
    }

    /// The changes squashing `start..stop` makes (nothing stored).
    pub fn squash_changes(&self, stack: &Stack, start: usize, stop: usize) -> Result<Vec<Change>> {
        if start > stop || stop > stack.depth() {
            return Err(Error::InvalidArgument(format!(
                "squash range {start}..{stop} is not within a stack of {}",
                crate::error::count(stack.depth(), "layer")
            )));
        }
        let below = self.prefix_index(stack, start)?;
        let top = self.prefix_index(stack, stop)?;
        Ok(diff_indices(&below, &top))
    }

    /// Squash layers `start..stop` of `stack` into one stored layer (also written to `tee`).
    pub fn squash(
        &self,
        stack: &Stack,
        start: usize,
        stop: usize,
        clamp_mtime_ns: Option<i64>,
        tee: Tee<'_>,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let mut changes = self.squash_changes(stack, start, stop)?;
        if let Some(max) = clamp_mtime_ns {
            clamp_mtimes(&mut changes, max);
        }
        self.emit(&changes, &FreshChunks::new(), tee, progress)
    }

    /// The stored changeset taking `a`'s view to `b`'s (mtimes clamped to `clamp_mtime_ns`).
    pub fn diff(
        &self,
        a: &Stack,
        b: &Stack,
        clamp_mtime_ns: Option<i64>,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let mut changes = diff_indices(&a.index, &b.index);
        if let Some(max) = clamp_mtime_ns {
            clamp_mtimes(&mut changes, max);
        }
        self.emit(&changes, &FreshChunks::new(), None, progress)
    }
}
