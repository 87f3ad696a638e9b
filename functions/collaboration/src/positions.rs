//! Positions inside the co-edited text, the way presence needs them: Yjs relative positions
//! (`StickyIndex`, what `Y.createRelativePositionFromTypeIndex` makes and awareness cursors
//! carry) resolved against the live document to offsets and paragraph indices, and the
//! reverse for REST clients that only know offsets.
//!
//! Offsets are UTF-16 code units of the root text `content` (what Yjs clients count; the
//! server's `yrs::Doc` counts bytes, so every index crosses [`TextIndex`]). Paragraphs are
//! the runs of text between `\n`. Because positions are kept as relative positions and
//! resolved again whenever the document changes, a prediction stays right while others
//! insert text above — a line number would not. A paragraph's *place* is the id of the Yjs
//! item of the newline that opens it, which does not change when text is inserted elsewhere.

use yrs::branch::BranchPtr;
use yrs::{Assoc, GetString, IndexScope, ReadTxn, StickyIndex, TextRef};

/// The root text type presence positions refer to (what y-websocket examples and the tests'
/// clients edit).
pub const TEXT_ROOT: &str = "content";

fn branch(root: &TextRef) -> BranchPtr {
    let b: &yrs::branch::Branch = root.as_ref();
    BranchPtr::from(b)
}

/// A resolved position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// UTF-16 code units from the start of the text.
    pub offset: u32,
    /// Paragraph index (0-based).
    pub paragraph: u32,
}

/// A position past the end of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange {
    pub offset: u32,
    pub length: u32,
}

/// The text of the document at one moment, indexed for resolving positions.
pub struct TextIndex {
    text: String,
    /// Byte positions of every `\n`.
    newlines: Vec<usize>,
    root: Option<TextRef>,
    length_utf16: u32,
}

impl TextIndex {
    pub fn of<T: ReadTxn>(txn: &T) -> TextIndex {
        let root = txn.get_text(TEXT_ROOT);
        let text = root.as_ref().map(|t| t.get_string(txn)).unwrap_or_default();
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let length_utf16 = text.encode_utf16().count() as u32;
        TextIndex {
            text,
            newlines,
            root,
            length_utf16,
        }
    }

    /// Length in UTF-16 code units.
    pub fn len_utf16(&self) -> u32 {
        self.length_utf16
    }

    pub fn paragraphs(&self) -> u32 {
        self.newlines.len() as u32 + 1
    }

    fn paragraph_of_byte(&self, byte: usize) -> u32 {
        self.newlines.partition_point(|&n| n < byte) as u32
    }

    fn floor_boundary(&self, mut byte: usize) -> usize {
        byte = byte.min(self.text.len());
        while !self.text.is_char_boundary(byte) {
            byte -= 1;
        }
        byte
    }

    /// Where `sticky` points now; `None` when it refers to another type or to content this
    /// document has not received yet (it resolves once it has).
    pub fn resolve<T: ReadTxn>(&self, txn: &T, sticky: &StickyIndex) -> Option<Pos> {
        let Some(root) = self.root.as_ref() else {
            // No text yet: a position in it (what a REST client gets on an empty document)
            // is its start.
            return matches!(sticky.scope(), IndexScope::Root(name) if &**name == TEXT_ROOT)
                .then_some(Pos {
                    offset: 0,
                    paragraph: 0,
                });
        };
        let offset = sticky.get_offset(txn)?;
        if offset.branch != branch(root) {
            return None;
        }
        let byte = self.floor_boundary(offset.index as usize);
        Some(Pos {
            offset: self.text[..byte].encode_utf16().count() as u32,
            paragraph: self.paragraph_of_byte(byte),
        })
    }

    /// The byte index of a UTF-16 offset (inside a surrogate pair: the character's start).
    fn byte_of(&self, offset: u32) -> Result<usize, OutOfRange> {
        if offset > self.length_utf16 {
            return Err(OutOfRange {
                offset,
                length: self.length_utf16,
            });
        }
        let mut units = 0u32;
        for (i, c) in self.text.char_indices() {
            let next = units + c.len_utf16() as u32;
            if next > offset {
                return Ok(i);
            }
            units = next;
        }
        Ok(self.text.len())
    }

    /// The position of a UTF-16 offset, resolved now.
    pub fn pos_of(&self, offset: u32) -> Result<Pos, OutOfRange> {
        let byte = self.byte_of(offset)?;
        Ok(Pos {
            offset: self.text[..byte].encode_utf16().count() as u32,
            paragraph: self.paragraph_of_byte(byte),
        })
    }

    /// A relative position for a UTF-16 offset (what a REST client sends), associated with
    /// the character after it, so that text typed before it pushes it along, as in Yjs.
    pub fn sticky_at<T: ReadTxn>(&self, txn: &T, offset: u32) -> Result<StickyIndex, OutOfRange> {
        let byte = self.byte_of(offset)?;
        let Some(root) = self.root.as_ref() else {
            return Ok(StickyIndex::new(
                IndexScope::Root(TEXT_ROOT.into()),
                Assoc::After,
            ));
        };
        if byte < self.text.len()
            && let Some(s) = StickyIndex::at(txn, branch(root), byte as u32, Assoc::After)
        {
            return Ok(s);
        }
        // At the end: relative to the type, so it stays at the end (as Yjs does).
        Ok(StickyIndex::from_type(txn, root, Assoc::After))
    }

    /// A stable name for paragraph `paragraph`: `start` for the first, else the Yjs id of
    /// the newline that opens it.
    pub fn place<T: ReadTxn>(&self, txn: &T, paragraph: u32) -> String {
        if paragraph == 0 {
            return "start".into();
        }
        let (Some(root), Some(&nl)) = (
            self.root.as_ref(),
            self.newlines.get(paragraph as usize - 1),
        ) else {
            return format!("p{paragraph}");
        };
        match StickyIndex::at(txn, branch(root), nl as u32, Assoc::After)
            .as_ref()
            .and_then(|s| s.id())
        {
            Some(id) => format!("{}-{}", id.client, id.clock),
            None => format!("p{paragraph}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, GetString, Text, Transact};

    #[test]
    fn sticky_positions_follow_inserts_above() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text(TEXT_ROOT);
        text.insert(&mut doc.transact_mut(), 0, "one\ntwo\nthree");
        let (sticky, place) = {
            let txn = doc.transact();
            let ix = TextIndex::of(&txn);
            assert_eq!(ix.paragraphs(), 3);
            let s = ix.sticky_at(&txn, 5).unwrap();
            assert_eq!(
                ix.resolve(&txn, &s),
                Some(Pos {
                    offset: 5,
                    paragraph: 1
                })
            );
            assert!(ix.sticky_at(&txn, 14).is_err());
            (s, ix.place(&txn, 1))
        };
        text.insert(&mut doc.transact_mut(), 0, "zero\n\n");
        let txn = doc.transact();
        let ix = TextIndex::of(&txn);
        assert_eq!(
            ix.resolve(&txn, &sticky),
            Some(Pos {
                offset: 11,
                paragraph: 3
            })
        );
        assert_eq!(ix.place(&txn, 3), place, "the paragraph keeps its place");
        // The end stays at the end.
        let end = ix.sticky_at(&txn, ix.len_utf16()).unwrap();
        drop(txn);
        text.insert(&mut doc.transact_mut(), 19, "!");
        let txn = doc.transact();
        let ix = TextIndex::of(&txn);
        assert_eq!(ix.resolve(&txn, &end).unwrap().offset, ix.len_utf16());
    }

    /// Random edits around a marker (never deleting it): the relative position made for the
    /// marker keeps resolving to the marker's offset and paragraph.
    #[test]
    fn positions_follow_random_edits() {
        let mut seed = 7u64;
        let mut rnd = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % n.max(1)
        };
        for round in 0..20 {
            let doc = Doc::new();
            let text = doc.get_or_insert_text(TEXT_ROOT);
            text.insert(&mut doc.transact_mut(), 0, "ab\ncd§ef\ngh");
            let sticky = {
                let txn = doc.transact();
                let ix = TextIndex::of(&txn);
                ix.sticky_at(&txn, 5).unwrap()
            };
            for _ in 0..60 {
                let current = text.get_string(&doc.transact());
                let marker = current.find('§').unwrap();
                let pieces = ["x", "\n", "é", "😀", "yz\n\n", " "];
                if rnd(3) > 0 {
                    // Insert at a random char boundary.
                    let bounds: Vec<usize> = current
                        .char_indices()
                        .map(|(i, _)| i)
                        .chain([current.len()])
                        .collect();
                    let at = bounds[rnd(bounds.len())];
                    text.insert(
                        &mut doc.transact_mut(),
                        at as u32,
                        pieces[rnd(pieces.len())],
                    );
                } else {
                    // Delete one character that is not the marker.
                    let chars: Vec<(usize, char)> = current
                        .char_indices()
                        .filter(|(i, _)| *i != marker)
                        .collect();
                    if let Some(&(i, c)) = chars.get(rnd(chars.len())) {
                        text.remove_range(&mut doc.transact_mut(), i as u32, c.len_utf8() as u32);
                    }
                }
                let txn = doc.transact();
                let now = text.get_string(&txn);
                let byte = now.find('§').unwrap();
                let ix = TextIndex::of(&txn);
                assert_eq!(
                    ix.resolve(&txn, &sticky),
                    Some(Pos {
                        offset: now[..byte].encode_utf16().count() as u32,
                        paragraph: now[..byte].matches('\n').count() as u32,
                    }),
                    "round {round}: {now:?}"
                );
            }
        }
    }

    #[test]
    fn utf16_offsets() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text(TEXT_ROOT);
        text.insert(&mut doc.transact_mut(), 0, "é😀\nx");
        let txn = doc.transact();
        let ix = TextIndex::of(&txn);
        assert_eq!(ix.len_utf16(), 5);
        let s = ix.sticky_at(&txn, 4).unwrap();
        assert_eq!(
            ix.resolve(&txn, &s),
            Some(Pos {
                offset: 4,
                paragraph: 1
            })
        );
        assert_eq!(
            ix.pos_of(3).unwrap(),
            Pos {
                offset: 3,
                paragraph: 0
            }
        );
    }

    #[test]
    fn empty_document() {
        let doc = Doc::new();
        let txn = doc.transact();
        let ix = TextIndex::of(&txn);
        assert_eq!(ix.len_utf16(), 0);
        let s = ix.sticky_at(&txn, 0).unwrap();
        assert_eq!(
            ix.resolve(&txn, &s),
            Some(Pos {
                offset: 0,
                paragraph: 0
            })
        );
        assert!(ix.sticky_at(&txn, 1).is_err());
    }
}
