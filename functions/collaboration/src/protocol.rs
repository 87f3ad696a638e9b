//! The y-websocket wire protocol as inkwire speaks it, on top of `yrs::sync`: exactly one
//! message decoded per incoming frame (`Message::decode` plus a trailing-bytes check —
//! `yrs::sync::MessageReader` silently ends on truncated input, and `Protocol::start` packs
//! two messages into one buffer, which y-websocket 1–3 clients cannot read), the outgoing
//! messages each encoded on their own, and the test that decides whether an update from a
//! read-only user would change the document (`Update::is_empty` is not it: a client's sync
//! step 2 always carries its whole delete set).

use yrs::encoding::read::Cursor;
use yrs::sync::{Awareness, AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::{Decode, Decoder, DecoderV1};
use yrs::updates::encoder::Encode;

use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// Why a frame was refused. Every variant closes the connection that sent it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed update: {0}")]
    MalformedUpdate(String),
}

/// A message a client may send, decoded from exactly one frame.
#[derive(Debug)]
pub enum Incoming {
    SyncStep1(StateVector),
    /// Sync step 2 or update (a v1 update, already checked to decode).
    Update(Vec<u8>),
    Awareness(AwarenessUpdate),
    QueryAwareness,
    /// An auth message from a client: ignored (clients never send one).
    Auth,
}

/// Decodes one frame into one message; anything else (truncated, trailing bytes, unknown
/// type or sync sub-type, an update that does not decode) is an error.
pub fn decode_frame(frame: &[u8]) -> Result<Incoming, FrameError> {
    let mut dec = DecoderV1::new(Cursor::new(frame));
    let msg = Message::decode(&mut dec).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let rest = dec
        .read_to_end()
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(match msg {
        Message::Sync(SyncMessage::SyncStep1(sv)) => Incoming::SyncStep1(sv),
        Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) => {
            Update::decode_v1(&u).map_err(|e| FrameError::MalformedUpdate(e.to_string()))?;
            Incoming::Update(u)
        }
        Message::Awareness(a) => Incoming::Awareness(a),
        Message::AwarenessQuery => Incoming::QueryAwareness,
        Message::Auth(_) => Incoming::Auth,
        Message::Custom(tag, _) => return Err(FrameError::UnknownType(tag)),
    })
}

/// `[0, 0, sv]`: the server's sync step 1.
pub fn sync_step1(doc: &Doc) -> Vec<u8> {
    Message::Sync(SyncMessage::SyncStep1(doc.transact().state_vector())).encode_v1()
}

/// `[0, 1, update]`: what the client lacks given its state vector (sent even when empty:
/// it is what marks a stock client `synced`).
pub fn sync_step2(doc: &Doc, client_sv: &StateVector) -> Vec<u8> {
    Message::Sync(SyncMessage::SyncStep2(
        doc.transact().encode_state_as_update_v1(client_sv),
    ))
    .encode_v1()
}

/// `[0, 2, update]`.
pub fn update(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update.to_vec())).encode_v1()
}

/// `[1, awareness update]`.
pub fn awareness(update: AwarenessUpdate) -> Vec<u8> {
    Message::Awareness(update).encode_v1()
}

/// Every known awareness state as one message, or `None` when there is none.
pub fn awareness_all(awareness: &Awareness) -> Option<Vec<u8>> {
    let update = awareness.update().ok()?;
    (!update.clients.is_empty()).then(|| self::awareness(update))
}

/// `[1, 1, 0]`: an awareness message with no entries. Clients apply it as a no-op, but it
/// counts as a received message for their 30-second reconnect watchdog.
pub const KEEPALIVE: [u8; 3] = [1, 1, 0];

/// `[2, 0, reason]`: permission denied (y-protocols `auth.js`).
pub fn permission_denied(reason: &str) -> Vec<u8> {
    Message::Auth(Some(reason.to_string())).encode_v1()
}

/// Would applying `update` change `doc`? True when it carries structs the document lacks
/// (also structs beyond the document's state that would wait as pending), or deletions the
/// document has not seen. Conservative: a malformed diff counts as a change.
pub fn would_change(doc: &Doc, update: &[u8]) -> bool {
    let txn = doc.transact();
    let sv = txn.state_vector();
    let Ok(upd) = Update::decode_v1(update) else {
        return true;
    };
    if upd.extends(&sv) {
        return true;
    }
    let beyond = yrs::diff_updates_v1(update, &sv.encode_v1())
        .ok()
        .and_then(|d| Update::decode_v1(&d).ok())
        .is_none_or(|d| !d.state_vector_lower().is_empty());
    if beyond {
        return true;
    }
    let ds = upd.delete_set();
    if ds.is_empty() {
        return false;
    }
    !ds.diff(&txn.snapshot().delete_set).is_empty()
}

/// What applying an update did: clock units inserted (characters, for text) and deleted,
/// net words added and removed where the text `content` changed, the paragraph it changed
/// in, and the Yjs client that wrote most of it (for "who wrote this text").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measure {
    pub inserted: u64,
    pub deleted: u64,
    pub words_added: u64,
    pub words_deleted: u64,
    pub paragraph: Option<u32>,
    pub client: Option<u64>,
}

/// Applies `update` to `doc` and measures it. Reads the text before and after (linear in its
/// length) to count words and find the paragraph.
pub fn apply_measured(doc: &Doc, update: &[u8]) -> Result<Measure, String> {
    apply_measured_with(doc, update, true)
}

/// [`apply_measured`]; without `text`, words and paragraph are not measured (and the text is
/// not read).
pub fn apply_measured_with(doc: &Doc, update: &[u8], text: bool) -> Result<Measure, String> {
    let upd = Update::decode_v1(update).map_err(|e| e.to_string())?;
    let mut txn = doc.transact_mut();
    let text_of = |txn: &yrs::TransactionMut| {
        if !text {
            return String::new();
        }
        txn.get_text(crate::positions::TEXT_ROOT)
            .map(|t| yrs::GetString::get_string(&t, txn))
            .unwrap_or_default()
    };
    let before_text = text_of(&txn);
    let before = txn.state_vector();
    txn.apply_update(upd).map_err(|e| e.to_string())?;
    let after = txn.state_vector();
    let mut client = None;
    let mut most = 0;
    let mut inserted = 0u64;
    for (c, clock) in after.iter() {
        let n = u64::from(clock.saturating_sub(before.get(c)));
        inserted += n;
        if n > most {
            most = n;
            client = Some(*c);
        }
    }
    let deleted = txn
        .delete_set()
        .iter()
        .flat_map(|(_, ranges)| ranges.iter().map(|r| u64::from(r.end - r.start)))
        .sum();
    let change = text_change(&before_text, &text_of(&txn));
    Ok(Measure {
        inserted,
        deleted,
        words_added: change.words_added,
        words_deleted: change.words_deleted,
        paragraph: change.paragraph,
        client: client.map(|c: yrs::ClientID| c.get()),
    })
}

/// Net words added and removed by turning `before` into `after`, counted over the changed
/// region widened to whole words (typing a word letter by letter adds one word), and the
/// paragraph (in `after`) where the change starts; `None` when the text did not change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextChange {
    pub words_added: u64,
    pub words_deleted: u64,
    pub paragraph: Option<u32>,
}

pub fn text_change(before: &str, after: &str) -> TextChange {
    if before == after {
        return TextChange::default();
    }
    let (b, a) = (before.as_bytes(), after.as_bytes());
    let mut prefix = b.iter().zip(a).take_while(|(x, y)| x == y).count();
    while !before.is_char_boundary(prefix) || !after.is_char_boundary(prefix) {
        prefix -= 1;
    }
    let max_suffix = b.len().min(a.len()) - prefix;
    let mut suffix = b
        .iter()
        .rev()
        .zip(a.iter().rev())
        .take(max_suffix)
        .take_while(|(x, y)| x == y)
        .count();
    while !before.is_char_boundary(b.len() - suffix) || !after.is_char_boundary(a.len() - suffix) {
        suffix -= 1;
    }
    // Widen to word boundaries: the common prefix and suffix are the same in both texts.
    let start = before[..prefix].rfind(char::is_whitespace).map_or(0, |i| {
        i + before[i..].chars().next().map_or(1, char::len_utf8)
    });
    let grow = before[b.len() - suffix..]
        .find(char::is_whitespace)
        .unwrap_or(suffix);
    let words = |s: &str| s.split_whitespace().count() as u64;
    let wb = words(&before[start..b.len() - suffix + grow]);
    let wa = words(&after[start..a.len() - suffix + grow]);
    TextChange {
        words_added: wa.saturating_sub(wb),
        words_deleted: wb.saturating_sub(wa),
        paragraph: Some(after[..prefix].bytes().filter(|c| *c == b'\n').count() as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{GetString, Text};

    fn doc_with(text: &str) -> Doc {
        let doc = Doc::new();
        let t = doc.get_or_insert_text("content");
        t.insert(&mut doc.transact_mut(), 0, text);
        doc
    }

    fn full_state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    #[test]
    fn decodes_exactly_one_message_per_frame() {
        let doc = doc_with("hello");
        let step1 = sync_step1(&doc);
        assert!(matches!(decode_frame(&step1), Ok(Incoming::SyncStep1(_))));
        let upd = update(&full_state(&doc));
        assert!(matches!(decode_frame(&upd), Ok(Incoming::Update(_))));
        assert!(matches!(decode_frame(&[3]), Ok(Incoming::QueryAwareness)));
        assert!(matches!(
            decode_frame(&KEEPALIVE),
            Ok(Incoming::Awareness(a)) if a.clients.is_empty()
        ));
        // Two messages packed in one frame: trailing bytes.
        let mut two = step1.clone();
        two.extend_from_slice(&step1);
        assert_eq!(
            decode_frame(&two).unwrap_err(),
            FrameError::Trailing(step1.len())
        );
    }

    #[test]
    fn refuses_garbage_truncation_and_unknown_types() {
        assert!(matches!(decode_frame(&[]), Err(FrameError::Malformed(_))));
        // A varint whose continuation bit promises more bytes.
        assert!(matches!(
            decode_frame(&[0x80]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode_frame(&[0, 0x80, 0x80]),
            Err(FrameError::Malformed(_))
        ));
        // Unknown sync sub-type.
        assert!(matches!(
            decode_frame(&[0, 7]),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            decode_frame(&[9, 0]).unwrap_err(),
            FrameError::UnknownType(9)
        );
        // A truncated update.
        let doc = doc_with("hello world");
        let upd = update(&full_state(&doc));
        assert!(decode_frame(&upd[..upd.len() - 3]).is_err());
        // A well-framed message whose update is garbage.
        let garbage = Message::Sync(SyncMessage::Update(vec![1, 2, 3, 4, 5, 6])).encode_v1();
        assert!(matches!(
            decode_frame(&garbage),
            Err(FrameError::MalformedUpdate(_))
        ));
    }

    #[test]
    fn no_op_updates_are_recognised() {
        let server = doc_with("hello");
        let client = Doc::new();
        client
            .transact_mut()
            .apply_update(Update::decode_v1(&full_state(&server)).unwrap())
            .unwrap();
        // A synced client's step 2 carries the delete set but changes nothing.
        let t = client.get_or_insert_text("content");
        t.remove_range(&mut client.transact_mut(), 0, 1);
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&full_state(&client)).unwrap())
            .unwrap();
        let reply = client
            .transact()
            .encode_state_as_update_v1(&server.transact().state_vector());
        let reply_bytes = reply.clone();
        let reply = Update::decode_v1(&reply).unwrap();
        assert!(!reply.is_empty(), "the step 2 is not empty");
        assert!(!would_change(&server, &reply_bytes));
        // An insertion and a deletion both change it.
        let sv = server.transact().state_vector();
        t.insert(&mut client.transact_mut(), 0, "X");
        let ins = client.transact().encode_state_as_update_v1(&sv);
        assert!(would_change(&server, &ins));
        let client2 = Doc::new();
        client2
            .transact_mut()
            .apply_update(Update::decode_v1(&full_state(&server)).unwrap())
            .unwrap();
        let t2 = client2.get_or_insert_text("content");
        let sv2 = client2.transact().state_vector();
        t2.remove_range(&mut client2.transact_mut(), 0, 2);
        let del = client2.transact().encode_state_as_update_v1(&sv2);
        assert!(would_change(&server, &del));
        let m = apply_measured(&server, &del).unwrap();
        assert_eq!((m.inserted, m.deleted), (0, 2));
        let m = apply_measured(&server, &ins).unwrap();
        assert_eq!((m.inserted, m.deleted), (1, 0));
        assert!(m.client.is_some());
        // Applied twice: nothing new.
        assert_eq!(apply_measured(&server, &ins).unwrap(), Measure::default());
        assert_eq!(t2.get_string(&client2.transact()), "lo");
    }

    #[test]
    fn words_and_paragraphs_of_a_change() {
        let c = |b: &str, a: &str| {
            let t = text_change(b, a);
            (t.words_added, t.words_deleted, t.paragraph)
        };
        // Typing a word letter by letter adds one word.
        assert_eq!(c("", "h"), (1, 0, Some(0)));
        assert_eq!(c("h", "he"), (0, 0, Some(0)));
        assert_eq!(c("hello", "hello "), (0, 0, Some(0)));
        assert_eq!(c("hello ", "hello w"), (1, 0, Some(0)));
        assert_eq!(c("one\ntwo three", "one\ntwo"), (0, 1, Some(1)));
        assert_eq!(c("one two", "one"), (0, 1, Some(0)));
        assert_eq!(c("a\nb\nc", "a\nb\nnew words here\nc"), (3, 0, Some(2)));
        assert_eq!(c("same", "same"), (0, 0, None));
        assert_eq!(c("éé x", "éé yx"), (0, 0, Some(0)));
        assert_eq!(c("ab", "a b"), (1, 0, Some(0)));
    }

    #[test]
    fn updates_ahead_of_the_document_count_as_changes() {
        // A client's second update arriving before its first: it would wait as pending,
        // and dropping it would lose it.
        let client = Doc::new();
        let t = client.get_or_insert_text("content");
        t.insert(&mut client.transact_mut(), 0, "ab");
        let sv = client.transact().state_vector();
        t.insert(&mut client.transact_mut(), 2, "cd");
        let second = client.transact().encode_state_as_update_v1(&sv);
        let server = Doc::new();
        assert!(would_change(&server, &second));
    }

    #[test]
    fn outgoing_messages_are_single_messages() {
        let doc = doc_with("x");
        for frame in [
            sync_step1(&doc),
            sync_step2(&doc, &StateVector::default()),
            update(&full_state(&doc)),
            permission_denied("read-only"),
            KEEPALIVE.to_vec(),
        ] {
            let mut dec = DecoderV1::new(Cursor::new(frame.as_slice()));
            Message::decode(&mut dec).unwrap();
            assert!(dec.read_to_end().unwrap().is_empty());
        }
        assert_eq!(
            permission_denied("read-only"),
            [&[2u8, 0, 9][..], b"read-only"].concat()
        );
    }
}
