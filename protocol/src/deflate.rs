//! permessage-deflate (RFC 7692) as Switchboard speaks it: the offer and
//! answer of the `Sec-WebSocket-Extensions` header, and the codec.
//!
//! Both directions run without context takeover: every message is
//! compressed on its own (raw DEFLATE, ended by a sync flush whose
//! trailing `00 00 ff ff` is left off), so its compressed bytes do not
//! depend on the socket. The edge compresses a broadcast once and sends
//! the same bytes to every compressing socket, and neither side keeps a
//! compressor or an inflater per socket: both live per thread and are
//! reset before each message.
use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What the Rust client offers: no context takeover either way, so that it
/// inflates and compresses each message with per-thread state.
pub const CLIENT_OFFER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Messages shorter than this are sent uncompressed by default (RSV1
/// clear), bytes: below a few hundred bytes DEFLATE without a shared
/// window saves little or nothing and costs a compression per message.
pub const DEFAULT_MIN_BYTES: usize = 256;

/// The edge's answer to an accepted offer. It always asks for no context
/// takeover in both directions: RFC 7692 lets a server add
/// `server_no_context_takeover` (section 7.1.1.1) and
/// `client_no_context_takeover` (7.1.1.2) to any offer it accepts.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The same, for an offer that limits the server's window to 15 bits
/// (the answer must repeat the limit, section 7.1.2.1).
const ANSWER_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";

/// The trailer RFC 7692 (7.2.1) strips from each compressed message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The compression level: zlib-rs's fastest full one (level 1 is its
/// "quick" strategy, which leaves chat-sized messages barely smaller);
/// on such messages it shrinks them about as much as level 6, for less.
const LEVEL: u32 = 2;

/// An extension's parameters: names, and values unquoted.
type Params<'a> = Vec<(&'a str, Option<&'a str>)>;

/// Each extension of a `Sec-WebSocket-Extensions` list: its name and
/// parameters, or `None` when it does not parse.
fn extensions(header: &str) -> impl Iterator<Item = Option<(&str, Params<'_>)>> {
    header
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|ext| {
            let mut parts = ext.split(';').map(str::trim);
            let name = parts.next().filter(|n| is_token(n))?;
            let mut params = Vec::new();
            for p in parts {
                let (key, value) = match p.split_once('=') {
                    Some((k, v)) => {
                        let v = v.trim();
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v);
                        (k.trim(), Some(v))
                    }
                    None => (p, None),
                };
                if !is_token(key) || value.is_some_and(|v| !is_token(v)) {
                    return None;
                }
                params.push((key, value));
            }
            Some((name, params))
        })
}

/// An HTTP token (RFC 7230): what names and values may be made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A window size parameter's value: 8 to 15, in plain decimal.
fn window_bits(value: &str) -> Option<u8> {
    if value.len() > 2 || value.starts_with('0') {
        return None;
    }
    value.parse().ok().filter(|b| (8..=15).contains(b))
}

/// The edge's side of the negotiation: given the request's
/// `Sec-WebSocket-Extensions` (every header line, joined with commas),
/// the answer that accepts the first acceptable permessage-deflate offer,
/// or `None` to decline them all (the socket then runs uncompressed).
///
/// An offer is declined when a parameter is unknown, repeated or has an
/// invalid value (section 7.1), and when it asks the server for a window
/// under 15 bits (`server_max_window_bits` < 15): the edge compresses each
/// broadcast once for every socket, with a 15-bit window.
/// `client_max_window_bits` and `client_no_context_takeover` are accepted
/// with any valid value: each client message is inflated on its own, with
/// a 15-bit window, whatever window the client used.
pub fn accept(offers: &str) -> Option<&'static str> {
    extensions(offers).flatten().find_map(|(name, params)| {
        if !name.eq_ignore_ascii_case(EXTENSION) {
            return None;
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut window_15 = false;
        for (key, value) in params {
            if seen.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                return None;
            }
            seen.push(key);
            match (key.to_ascii_lowercase().as_str(), value) {
                ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
                ("client_max_window_bits", None) => {}
                ("client_max_window_bits", Some(v)) => {
                    window_bits(v)?;
                }
                ("server_max_window_bits", Some(v)) => {
                    if window_bits(v)? != 15 {
                        return None;
                    }
                    window_15 = true;
                }
                _ => return None,
            }
        }
        Some(if window_15 { ANSWER_WINDOW_15 } else { ANSWER })
    })
}

/// What a server agreed to, as the Rust client reads its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// Whether the client may compress what it sends: not when the server
    /// limited the client's window under 15 bits (the client compresses
    /// with 15; sending uncompressed is always allowed).
    pub compress_outgoing: bool,
}

/// An answer to [`CLIENT_OFFER`] a client must fail the connection for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unusable Sec-WebSocket-Extensions answer: {0}")]
pub struct AnswerError(pub String);

/// The client's side: what the server's `Sec-WebSocket-Extensions` answer
/// (`None`: no header) agreed to, `Ok(None)` when it declined deflate.
/// An answer naming another extension, or deflate with context takeover
/// by the server or unknown parameters, is an error (RFC 6455 9.1,
/// RFC 7692 7.1).
pub fn agreed(answer: Option<&str>) -> Result<Option<Agreement>, AnswerError> {
    let Some(answer) = answer.filter(|a| !a.trim().is_empty()) else {
        return Ok(None);
    };
    let bad = || AnswerError(answer.chars().take(200).collect());
    let mut exts = extensions(answer);
    let (name, params) = exts.next().flatten().ok_or_else(bad)?;
    if exts.next().is_some() || !name.eq_ignore_ascii_case(EXTENSION) {
        return Err(bad());
    }
    let mut agreement = Agreement {
        compress_outgoing: true,
    };
    let mut server_no_context = false;
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in params {
        if seen.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return Err(bad());
        }
        seen.push(key);
        match (key.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) => server_no_context = true,
            ("client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => {
                window_bits(v).ok_or_else(bad)?;
            }
            ("client_max_window_bits", Some(v)) => {
                if window_bits(v).ok_or_else(bad)? < 15 {
                    agreement.compress_outgoing = false;
                }
            }
            _ => return Err(bad()),
        }
    }
    // This client inflates each message on its own.
    if !server_no_context {
        return Err(bad());
    }
    Ok(Some(agreement))
}

thread_local! {
    /// Raw DEFLATE state, reset before each message: no per-socket state.
    static DEFLATER: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Compresses one message as RFC 7692 sends it: raw DEFLATE ended by a
/// sync flush, its trailing `00 00 ff ff` removed.
pub fn compress(message: &[u8]) -> Vec<u8> {
    DEFLATER.with(|cell| {
        let mut c = cell.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        loop {
            let done = c.total_in() as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(message.len() - done + 64);
            }
            // Only an inconsistent stream fails, and this one was just reset.
            c.compress_vec(&message[done..], &mut out, FlushCompress::Sync)
                .expect("a reset deflate stream accepts input");
            // The flush is complete once input is used up with room to spare.
            if c.total_in() as usize == message.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        out
    })
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit (a decompression bomb stops
    /// there, having produced at most the limit plus one byte).
    #[error("compressed message inflates past {0} bytes")]
    TooLarge(usize),
    /// It is not valid DEFLATE data.
    #[error("invalid compressed data")]
    Malformed,
}

/// Inflates one message compressed as [`compress`] does (or by any RFC
/// 7692 peer without context takeover), refusing to produce more than
/// `max_bytes`.
pub fn inflate(compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|cell| {
        let mut d = cell.borrow_mut();
        d.reset(false);
        let mut out = Vec::with_capacity((compressed.len() * 4).max(64).min(max_bytes + 1));
        for part in [compressed, &TAIL[..]] {
            if feed(&mut d, part, &mut out, max_bytes)? {
                // A final block ends the message; what follows it (the
                // trailer we added) is not data.
                break;
            }
        }
        Ok(out)
    })
}

/// Inflates `input` into `out`; true when the DEFLATE stream ended.
fn feed(
    d: &mut Decompress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    max_bytes: usize,
) -> Result<bool, InflateError> {
    loop {
        if out.len() == out.capacity() {
            // Room for one byte past the limit, to see it crossed.
            let room = (max_bytes + 1).saturating_sub(out.len());
            if room == 0 {
                return Err(InflateError::TooLarge(max_bytes));
            }
            out.reserve_exact(out.capacity().max(256).min(room));
        }
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Malformed)?;
        input = &input[(d.total_in() - in_before) as usize..];
        if out.len() > max_bytes {
            return Err(InflateError::TooLarge(max_bytes));
        }
        if status == Status::StreamEnd {
            return Ok(true);
        }
        let progress = d.total_in() != in_before || d.total_out() != out_before;
        let full = out.len() == out.capacity();
        if input.is_empty() && !full {
            return Ok(false);
        }
        if !progress && !full {
            return Err(InflateError::Malformed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes DEFLATE cannot shrink (xorshift64).
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    const CHAT: &str = r#"{"delivery":{"chat":"team-42","seq":"1017","sender":"alice","payload":"eyJ0eXBlIjoidGV4dCIsInRleHQiOiJzZWUgeW91IGF0IHRoZSBzdGFuZHVwIn0=","clientMsgId":"m-1a2b3c","sentAtMs":"1764921600123","epoch":"e1"}}"#;

    #[test]
    fn a_message_round_trips_without_its_trailer() {
        for msg in [
            CHAT.as_bytes().to_vec(),
            Vec::new(),
            vec![7u8; 100_000],
            noise(70_000),
        ] {
            let packed = compress(&msg);
            assert!(!packed.ends_with(&TAIL), "the trailer is removed");
            assert_eq!(inflate(&packed, msg.len().max(1)).unwrap(), msg);
        }
        // The same bytes for the same message, whatever came before: no context.
        let first = compress(CHAT.as_bytes());
        compress(b"something else entirely, to leave state behind if there were any");
        assert_eq!(compress(CHAT.as_bytes()), first);
        assert!(first.len() < CHAT.len());
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = compress(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
        assert_eq!(
            inflate(&bomb, 64 << 10),
            Err(InflateError::TooLarge(64 << 10))
        );
        // Exactly the limit passes.
        let exact = compress(&[1u8; 1000]);
        assert_eq!(inflate(&exact, 1000).unwrap().len(), 1000);
        assert_eq!(inflate(&exact, 999), Err(InflateError::TooLarge(999)));
    }

    #[test]
    fn garbage_is_malformed() {
        // BTYPE 11 is reserved.
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1024),
            Err(InflateError::Malformed)
        );
        // A stored block whose LEN and NLEN disagree.
        assert_eq!(
            inflate(&[0x00, 0x05, 0x00, 0x00, 0x00], 1024),
            Err(InflateError::Malformed)
        );
    }

    #[test]
    fn a_final_block_also_ends_a_message() {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(1024);
        c.compress_vec(CHAT.as_bytes(), &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(inflate(&out, 4096).unwrap(), CHAT.as_bytes());
    }

    #[test]
    fn the_edge_accepts_the_first_offer_it_can_keep() {
        let plain = Some(ANSWER);
        // Chromium's and Firefox's offer.
        assert_eq!(accept("permessage-deflate; client_max_window_bits"), plain);
        assert_eq!(accept(CLIENT_OFFER), plain);
        assert_eq!(accept("permessage-deflate"), plain);
        assert_eq!(
            accept("Permessage-Deflate; Client_Max_Window_Bits=\"10\""),
            plain
        );
        assert_eq!(
            accept("permessage-deflate; server_max_window_bits=15"),
            Some(ANSWER_WINDOW_15)
        );
        // A smaller server window is declined; the next offer is taken.
        assert_eq!(
            accept("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            plain
        );
        assert_eq!(accept("x-webkit-deflate-frame, permessage-deflate"), plain);
        for declined in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=08",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "permessage-deflate; a b",
        ] {
            assert_eq!(accept(declined), None, "{declined:?}");
        }
    }

    #[test]
    fn the_client_reads_the_answer() {
        let yes = Ok(Some(Agreement {
            compress_outgoing: true,
        }));
        assert_eq!(agreed(None), Ok(None));
        assert_eq!(agreed(Some("")), Ok(None));
        assert_eq!(agreed(Some(ANSWER)), yes);
        assert_eq!(agreed(Some(ANSWER_WINDOW_15)), yes);
        assert_eq!(
            agreed(Some(
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=9"
            )),
            Ok(Some(Agreement {
                compress_outgoing: false
            }))
        );
        for bad in [
            // The server would keep its window: this client cannot follow.
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; bogus",
            "x-other",
            "permessage-deflate; server_no_context_takeover, x-other",
        ] {
            assert!(agreed(Some(bad)).is_err(), "{bad:?}");
        }
        // What the edge answers, the client takes.
        for offer in [
            CLIENT_OFFER,
            "permessage-deflate; server_max_window_bits=15",
        ] {
            assert!(agreed(accept(offer)).unwrap().is_some(), "{offer}");
        }
    }
}
