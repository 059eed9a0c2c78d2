//! The one rule for a prefetch list (a working set recorded by an earlier lazy restore, read
//! back from the store, so untrusted): an entry counts only when it names a block being
//! served and an offset inside that block's served length, and each chunk counts once, at
//! its first entry. Everything else is dropped, and the order of the rest is kept. Private
//! page servers, servers over a shared base, the base's own fill and the restore that copies
//! a list for a base all go through [`chunks_of`], so they cannot disagree on what a list
//! loads.

use std::sync::Arc;

/// The entries of `list` that count for `blocks` ((idstr, served length) each), as (block
/// index, chunk index) with chunks of `chunk` bytes, in order, and how many entries were
/// dropped (all of them for chunks of 0 bytes).
pub fn chunks_of<'a>(
    list: &[(Arc<str>, u64)],
    blocks: impl IntoIterator<Item = (&'a str, u64)>,
    chunk: u64,
) -> (Vec<(usize, u64)>, usize) {
    if chunk == 0 {
        return (Vec::new(), list.len());
    }
    let blocks: Vec<(&str, u64)> = blocks.into_iter().collect();
    let mut seen: Vec<Vec<u64>> =
        blocks.iter().map(|(_, len)| vec![0u64; len.div_ceil(chunk).div_ceil(64) as usize]).collect();
    let most = blocks.iter().map(|(_, len)| len.div_ceil(chunk)).sum::<u64>();
    let mut out = Vec::with_capacity(list.len().min(usize::try_from(most).unwrap_or(usize::MAX)));
    for (idstr, off) in list {
        let Some(bi) = blocks.iter().position(|(name, _)| *name == &**idstr) else {
            continue;
        };
        if *off >= blocks[bi].1 {
            continue;
        }
        let ci = off / chunk;
        let (word, bit) = ((ci / 64) as usize, 1u64 << (ci % 64));
        if seen[bi][word] & bit == 0 {
            seen[bi][word] |= bit;
            out.push((bi, ci));
        }
    }
    let dropped = list.len() - out.len();
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_blocks_offsets_past_the_end_and_repeats_are_dropped_in_order() {
        let e = |b: &str, off: u64| (Arc::<str>::from(b), off);
        let list = vec![
            e("b", 0x1_0000),
            e("a", 0x2_0010), // chunk 2 of a
            e("nope", 0),
            e("a", 0x2_0000), // chunk 2 again
            e("a", 0x4_0000), // past a's length
            e("b", 0x1_fff0), // chunk 1 of b again
            e("a", 0),
        ];
        let (chunks, dropped) = chunks_of(&list, [("a", 0x4_0000), ("b", 0x2_0000)], 0x1_0000);
        assert_eq!(chunks, vec![(1, 1), (0, 2), (0, 0)]);
        assert_eq!(dropped, 4);
    }
}
