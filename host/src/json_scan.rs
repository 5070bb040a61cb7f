//! A strict scanner for the JSON of readings: the members of one object,
//! as borrowed slices, in one pass and without allocating.
//!
//! The fast path of every stage that reads readings (ingest's validation,
//! the stream stage, the archive). It checks the full JSON grammar of what
//! it takes, but takes only the plain case: a string holding an escape or a
//! control character, or nesting deeper than [`MAX_DEPTH`], is declined
//! (`None`), as is anything that is not valid JSON. The caller then parses
//! the same bytes with serde_json, whose answer (and error message) is the
//! one that counts; so this scanner must never take what serde_json would
//! refuse, and every caller's tests compare the two paths on the same
//! inputs.
//!
//! Must not: decode values (numbers and strings are handed over as their
//! JSON text), or allocate.

/// Nesting (objects and arrays inside the scanned object) deeper than this
/// is declined; serde_json refuses past 128.
pub const MAX_DEPTH: usize = 64;

/// `bytes` as text, when they are UTF-8 (JSON text must be): the first
/// step of every scan, so checked with SIMD (`simdutf8`; `std`'s check was
/// a seventh of the stream stage's folding of a reading). Its answer is
/// `std::str::from_utf8`'s (tested).
#[inline]
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(bytes).ok()
}

/// Scans the JSON object that starts at `s[at]` and hands each of its
/// members to `member(key, value)` in order: the key without its quotes,
/// the value as its JSON text (a string with its quotes). Returns the index
/// just past the object's closing brace, or `None` (after any number of
/// calls) when the object is not valid JSON or holds something left to
/// serde_json (see the module header).
pub fn object<'a>(
    s: &'a str,
    at: usize,
    mut member: impl FnMut(&'a str, &'a str),
) -> Option<usize> {
    let b = s.as_bytes();
    if b.get(at) != Some(&b'{') {
        return None;
    }
    let mut i = ws(b, at + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        let key_end = string(b, i)?;
        let key = &s[i + 1..key_end - 1];
        i = ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        let value_end = value(b, i, MAX_DEPTH)?;
        member(key, &s[i..value_end]);
        i = ws(b, value_end);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Scans `s` as exactly one JSON object (whitespace around it allowed), as
/// [`object`] does.
pub fn whole_object<'a>(s: &'a str, member: impl FnMut(&'a str, &'a str)) -> Option<()> {
    let b = s.as_bytes();
    let end = object(s, ws(b, 0), member)?;
    (ws(b, end) == b.len()).then_some(())
}

/// The text of a plain JSON string value (`"…"`, as [`object`] hands it
/// over, so without escapes) without its quotes; `None` for any other value.
pub fn plain_str(value: &str) -> Option<&str> {
    value.strip_prefix('"')?.strip_suffix('"')
}

/// The index just past JSON whitespace from `i` on.
pub fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index just past the value at `b[i]`.
fn value(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string(b, i),
        b'-' | b'0'..=b'9' => number(b, i),
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        b'{' => nested_object(b, i, depth.checked_sub(1)?),
        b'[' => array(b, i, depth.checked_sub(1)?),
        _ => None,
    }
}

/// The index just past a string at `b[i]` without escapes or control
/// characters.
fn string(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    // Eight bytes at a time while eight are left: strings are most of a
    // reading's bytes.
    while let Some(chunk) = b.get(j..j + 8) {
        let special = special_bytes(u64::from_le_bytes(chunk.try_into().ok()?));
        if special != 0 {
            j += (special.trailing_zeros() / 8) as usize;
            return (b[j] == b'"').then_some(j + 1);
        }
        j += 8;
    }
    loop {
        match *b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' | 0..=0x1f => return None,
            _ => j += 1,
        }
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `v` (little-endian) that ends a plain
/// string's scan: `"`, `\` or a control character below 0x20. Exact for
/// the lowest such byte (a borrow can flag bytes above it, never below).
fn special_bytes(v: u64) -> u64 {
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let below_space = v.wrapping_sub(ONES * 0x20) & !v & HIGHS;
    zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\'))) | below_space
}

/// The index just past a number at `b[i]`:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn number(b: &[u8], i: usize) -> Option<usize> {
    let digits = |mut j: usize| {
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        j
    };
    let mut j = i;
    if b.get(j) == Some(&b'-') {
        j += 1;
    }
    match *b.get(j)? {
        b'0' => j += 1,
        b'1'..=b'9' => j = digits(j + 1),
        _ => return None,
    }
    if b.get(j) == Some(&b'.') {
        let k = digits(j + 1);
        if k == j + 1 {
            return None;
        }
        j = k;
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let k = digits(j);
        if k == j {
            return None;
        }
        j = k;
    }
    Some(j)
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

fn nested_object(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    let mut j = ws(b, i + 1);
    if b.get(j) == Some(&b'}') {
        return Some(j + 1);
    }
    loop {
        j = ws(b, string(b, j)?);
        if b.get(j) != Some(&b':') {
            return None;
        }
        j = ws(b, value(b, ws(b, j + 1), depth)?);
        match *b.get(j)? {
            b',' => j = ws(b, j + 1),
            b'}' => return Some(j + 1),
            _ => return None,
        }
    }
}

fn array(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    let mut j = ws(b, i + 1);
    if b.get(j) == Some(&b']') {
        return Some(j + 1);
    }
    loop {
        j = ws(b, value(b, j, depth)?);
        match *b.get(j)? {
            b',' => j = ws(b, j + 1),
            b']' => return Some(j + 1),
            _ => return None,
        }
    }
}

/// Every prefix of `s` and every change of one of its bytes to one of a
/// set of bytes that matter to JSON (those that are still UTF-8): inputs
/// on which a fast path and serde_json must agree.
#[cfg(test)]
pub(crate) fn damaged(s: &str) -> Vec<String> {
    let bytes = s.as_bytes();
    let mut out: Vec<String> = (0..bytes.len()).map(|cut| s[..cut].to_owned()).collect();
    for at in 0..bytes.len() {
        for &with in b" \"\\,:{}[]0-.eE+9atnu\x01" {
            let mut v = bytes.to_vec();
            v[at] = with;
            if let Ok(t) = String::from_utf8(v) {
                out.push(t);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(s: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        whole_object(s, |k, v| out.push((k.to_owned(), v.to_owned())))?;
        Some(out)
    }

    /// Whether serde_json takes `s` as one JSON value.
    fn serde_takes(s: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
    }

    #[test]
    fn members_come_as_their_json_text() {
        let got = members(
            r#" { "a" : "x y" , "b":-0.5e+3,"c":[1, {"d":null}, true ],"e":{},"f":[] ,"g":false} "#,
        )
        .expect("taken");
        let want = [
            ("a", r#""x y""#),
            ("b", "-0.5e+3"),
            ("c", r#"[1, {"d":null}, true ]"#),
            ("e", "{}"),
            ("f", "[]"),
            ("g", "false"),
        ];
        assert_eq!(got.len(), want.len());
        for ((k, v), (wk, wv)) in got.iter().zip(want) {
            assert_eq!((k.as_str(), v.as_str()), (wk, wv));
        }
        assert_eq!(members("{}"), Some(vec![]));
        assert_eq!(plain_str(r#""MTR-1""#), Some("MTR-1"));
        assert_eq!(plain_str("12"), None);
    }

    /// The eight-at-a-time string scan ends where a byte-by-byte one does,
    /// wherever the special byte is and whatever surrounds it.
    #[test]
    fn strings_end_at_their_first_special_byte() {
        let by_byte = |b: &[u8]| {
            let mut j = 1;
            loop {
                match *b.get(j)? {
                    b'"' => return Some(j + 1),
                    b'\\' | 0..=0x1f => return None,
                    _ => j += 1,
                }
            }
        };
        for len in 0..24 {
            for filler in [b'a', 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']', 0x21, 0x5d] {
                for special in [b'"', b'\\', 0x00, 0x1f, 0x0a, b' '] {
                    for at in 0..=len {
                        let mut v = vec![b'"'];
                        v.extend(std::iter::repeat_n(filler, len));
                        if at < len {
                            v[1 + at] = special;
                        }
                        v.extend_from_slice(b"\"xyz");
                        assert_eq!(string(&v, 0), by_byte(&v), "{v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_utf8_check_agrees_with_std() {
        let mut cases: Vec<Vec<u8>> = vec![
            b"{\"meterId\":\"MTR-00000001\"}".to_vec(),
            "{\"region\":\"M\u{fc}nchen-S\u{fc}d \u{1f50c}\"}"
                .as_bytes()
                .to_vec(),
            vec![0xc0, 0x80],             // overlong NUL
            vec![0xed, 0xa0, 0x80],       // a surrogate
            vec![0xf4, 0x90, 0x80, 0x80], // past U+10FFFF
            vec![0xe2, 0x82],             // cut short
            vec![0xff],
            Vec::new(),
        ];
        // Each of them inside a long ASCII run, where SIMD takes over.
        let long: Vec<Vec<u8>> = cases
            .iter()
            .map(|c| [vec![b'a'; 100], c.clone(), vec![b'z'; 100]].concat())
            .collect();
        cases.extend(long);
        for c in &cases {
            assert_eq!(utf8(c), std::str::from_utf8(c).ok(), "{c:?}");
        }
    }

    /// Never takes what serde_json refuses; declines escapes and deep
    /// nesting, which serde_json may take.
    #[test]
    fn takes_nothing_serde_json_refuses() {
        let refused = [
            "",
            "{",
            "}",
            "[]",
            "1",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{,"a":1}"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":True}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[,1]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":"x}"#,
            r#"{a:1}"#,
            r#"{"a":1}}"#,
            r#"{"a":1} x"#,
            r#"{"a":[1}"#,
            r#"{"a":{]}"#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\t\"}",
            r#"{"a":'x'}"#,
            r#"{"a":NaN}"#,
            r#"{"a":Infinity}"#,
            r#"{"a":0x1}"#,
            "{\"a\":1\u{a0}}",
        ];
        for s in refused {
            assert!(members(s).is_none(), "took {s:?}");
        }
        let declined = [r#"{"a":"\n"}"#, r#"{"a\u0062":1}"#, r#"{"a":"\"q\""}"#];
        for s in declined {
            assert!(serde_takes(s), "{s}");
            assert!(members(s).is_none(), "took {s:?}");
        }
        let nested = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(serde_takes(&nested(MAX_DEPTH + 1)));
        assert!(members(&nested(MAX_DEPTH + 1)).is_none());
        assert!(members(&nested(MAX_DEPTH)).is_some());
    }

    /// Every prefix and every one-byte change of a reading is taken only if
    /// serde_json takes it too.
    #[test]
    fn damaged_readings_are_taken_only_when_serde_json_takes_them() {
        let reading = r#"{"readingId":"r-1","meterId":"MTR-00000001","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"voltage":230,"temperature":-1.5e1,"metadata":{"mode":"normal","phases":[1,2,3],"ok":true,"none":null}}"#;
        assert!(members(reading).is_some());
        let mut checked = 0;
        for s in damaged(reading) {
            if members(&s).is_some() {
                assert!(serde_takes(&s), "took {s:?}");
                checked += 1;
            }
        }
        assert!(checked > 1000, "only {checked} changed readings were taken");
    }
}
