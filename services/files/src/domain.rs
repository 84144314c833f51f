//! The files domain's values: names, types and their check against content, purposes, ranges.

use crate::error::{FilesError, Result};

/// Longest file name, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Bytes of the start of a file the type check looks at.
pub const SNIFF_BYTES: usize = 4096;

/// A file's name: as given (for display) and made safe (for file systems and headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName {
    pub original: String,
    pub safe: String,
}

/// Windows device names, refused as a file's stem by some systems whatever the extension.
pub const RESERVED_STEMS: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8", "COM9", "LPT1", "LPT2",
    "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

impl FileName {
    /// Refuses what cannot be a file's name (empty, a path, control characters, `.` or `..`);
    /// anything else is kept as given and also made safe: characters some systems forbid become
    /// `_`, leading and trailing dots and whitespace go, a reserved device name gets a `_` prefix.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let original = value.trim();
        if original.is_empty() {
            return Err(FilesError::invalid(field, "is required"));
        }
        if original.chars().count() > MAX_NAME_CHARS {
            return Err(FilesError::invalid(field, format!("must be at most {MAX_NAME_CHARS} characters long")));
        }
        if original.chars().any(char::is_control) {
            return Err(FilesError::invalid(field, "must not contain control characters"));
        }
        if original.contains(['/', '\\']) {
            return Err(FilesError::invalid(field, "must be a file name, not a path"));
        }
        if original == "." || original == ".." {
            return Err(FilesError::invalid(field, "must be a file name, not a directory"));
        }
        Ok(Self { original: original.to_owned(), safe: safe_name(original) })
    }
}

fn safe_name(name: &str) -> String {
    let replaced: String =
        name.chars().map(|c| if matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') { '_' } else { c }).collect();
    // Any whitespace, not only ' ': parse trims Unicode whitespace, so the safe name of a safe
    // name must not lose an ideographic space the first pass left at an end.
    let trimmed = replaced.trim_matches(|c: char| c == '.' || c.is_whitespace());
    let safe = if trimmed.is_empty() { "file" } else { trimmed };
    let raw_stem = safe.split('.').next().unwrap_or_default();
    let stem = raw_stem.trim_end();
    if !RESERVED_STEMS.iter().any(|reserved| reserved.eq_ignore_ascii_case(stem)) {
        return safe.to_owned();
    }
    // `_CON.txt`: the prefix makes the stem no device name. The whitespace that hid the device
    // name goes, and a name that the prefix makes too long loses characters at its end, so the
    // safe name still fits MAX_NAME_CHARS and is its own safe name.
    let mut prefixed = format!("_{stem}{}", &safe[raw_stem.len()..]);
    while prefixed.chars().count() > MAX_NAME_CHARS {
        prefixed.pop();
    }
    prefixed.trim_end_matches(|c: char| c == '.' || c.is_whitespace()).to_owned()
}

/// Why a file was uploaded, which decides what releasing a chat session does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Kept until deleted.
    Library,
    /// Deleted when the last session that links it is released.
    Attachment,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Library => "library",
            Self::Attachment => "attachment",
        }
    }

    pub fn parse_db(value: &str) -> Self {
        if value == "attachment" { Self::Attachment } else { Self::Library }
    }
}

/// A MIME type as `type/subtype`, lowercase, parameters dropped.
pub fn mime_type(field: &'static str, value: &str) -> Result<String> {
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let valid_part =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c));
    match essence.split_once('/') {
        Some((kind, subtype)) if valid_part(kind) && valid_part(subtype) && essence.len() <= 255 => Ok(essence),
        _ if essence.is_empty() => Err(FilesError::invalid(field, "is required")),
        _ => Err(FilesError::invalid(field, "must be a MIME type such as image/png")),
    }
}

/// Whether `mime` is one of `allowed` (exact, or a family such as `image/*`).
pub fn is_allowed(mime: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|pattern| match pattern.strip_suffix("/*") {
        Some(family) => mime.split_once('/').is_some_and(|(kind, _)| kind.eq_ignore_ascii_case(family)),
        None => pattern.eq_ignore_ascii_case(mime),
    })
}

/// The MIME family, the seed's `file_type`.
pub fn family(mime: &str) -> &str {
    mime.split_once('/').map_or(mime, |(kind, _)| kind)
}

/// Magic bytes of the formats we recognise, at offset 0 unless stated.
const SIGNATURES: &[(&str, &[u8])] = &[
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("image/jpeg", b"\xff\xd8\xff"),
    ("image/gif", b"GIF87a"),
    ("image/gif", b"GIF89a"),
    ("image/bmp", b"BM"),
    ("image/tiff", b"II*\x00"),
    ("image/tiff", b"MM\x00*"),
    ("application/pdf", b"%PDF-"),
    ("application/zip", b"PK\x03\x04"),
    ("application/gzip", b"\x1f\x8b"),
    ("application/x-7z-compressed", b"7z\xbc\xaf\x27\x1c"),
    ("application/x-executable", b"\x7fELF"),
    ("application/x-msdownload", b"MZ"),
    ("audio/mpeg", b"ID3"),
    ("audio/flac", b"fLaC"),
    ("audio/ogg", b"OggS"),
];

/// What the content's first bytes say it is, if we recognise it.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    if let Some((mime, _)) = SIGNATURES.iter().find(|(_, magic)| head.starts_with(magic)) {
        return Some(mime);
    }
    if head.len() >= 12 && &head[0..4] == b"RIFF" {
        return match &head[8..12] {
            b"WEBP" => Some("image/webp"),
            b"WAVE" => Some("audio/wav"),
            b"AVI " => Some("video/x-msvideo"),
            _ => None,
        };
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        return Some("video/mp4");
    }
    None
}

/// Whether `head` reads as text: UTF-8 (a character cut at the end is fine) without NUL bytes.
pub fn looks_like_text(head: &[u8]) -> bool {
    if head.contains(&0) {
        return false;
    }
    match std::str::from_utf8(head) {
        Ok(_) => true,
        // Only an incomplete last character (error_len None) is allowed.
        Err(error) => error.error_len().is_none() && head.len() - error.valid_up_to() < 4,
    }
}

/// Whether `head` is text a person wrote: text without control characters other than
/// whitespace. Two or three printable bytes such as `BM`, `MZ` or `ID3` start some binary
/// formats, but also words: such content is still text.
fn is_plain_text(head: &[u8]) -> bool {
    looks_like_text(head)
        && String::from_utf8_lossy(head).chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c'))
}

/// Types whose content must be text.
fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(mime, "application/json" | "application/xml" | "application/x-ndjson" | "application/yaml")
        || mime.ends_with("+json")
        || mime.ends_with("+xml")
}

/// Formats built on a container we recognise: a `.docx` is a zip, an `.m4a` an mp4.
fn same_container(declared: &str, detected: &str) -> bool {
    match detected {
        "application/zip" => {
            declared.starts_with("application/vnd.openxmlformats")
                || declared.starts_with("application/vnd.oasis.opendocument")
                || matches!(declared, "application/epub+zip" | "application/java-archive")
        }
        "video/mp4" => {
            declared.starts_with("video/")
                || matches!(declared, "audio/mp4" | "audio/x-m4a" | "image/heic" | "image/avif")
        }
        "application/gzip" => matches!(declared, "application/x-gzip" | "application/x-tar+gzip"),
        _ => false,
    }
}

/// Refuses content that contradicts the declared type: a recognised format other than the
/// declared one, binary content declared as text, or a declared format whose magic bytes are
/// missing. `application/octet-stream` claims nothing and fits anything.
pub fn check_content(declared: &str, head: &[u8]) -> Result<()> {
    if declared == "application/octet-stream" {
        return Ok(());
    }
    let detected = sniff(head);
    let fits = match detected {
        Some(_) if is_textual(declared) && is_plain_text(head) => true,
        Some(detected) => detected == declared || same_container(declared, detected),
        None if is_textual(declared) => looks_like_text(head),
        // A declared format we know the signature of must carry it.
        None => !SIGNATURES.iter().any(|(mime, _)| *mime == declared) && !is_riff_or_mp4(declared),
    };
    if fits { Ok(()) } else { Err(FilesError::TypeMismatch { declared: declared.to_owned(), detected }) }
}

fn is_riff_or_mp4(mime: &str) -> bool {
    matches!(mime, "image/webp" | "audio/wav" | "video/mp4")
}

/// A hex SHA-256 as declared by a client; empty is none.
pub fn sha256(field: &'static str, value: &str) -> Result<Option<[u8; 32]>> {
    if value.is_empty() {
        return Ok(None);
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(value.trim(), &mut digest)
        .map_err(|_| FilesError::invalid(field, "must be 64 hexadecimal digits"))?;
    Ok(Some(digest))
}

/// The bytes of a file a download asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// From `offset`, `length` bytes (0: to the end).
    From { offset: u64, length: u64 },
    /// The last `length` bytes.
    Suffix(u64),
}

impl RangeRequest {
    /// Reads the three range fields of a download request.
    pub fn parse(offset: i64, length: i64, suffix_length: i64) -> Result<Self> {
        let non_negative = |field: &'static str, value: i64| {
            u64::try_from(value).map_err(|_| FilesError::invalid(field, "must not be negative"))
        };
        let (offset, length, suffix) = (
            non_negative("offset", offset)?,
            non_negative("length", length)?,
            non_negative("suffix_length", suffix_length)?,
        );
        if suffix > 0 {
            if offset > 0 || length > 0 {
                return Err(FilesError::invalid("suffix_length", "excludes offset and length"));
            }
            return Ok(Self::Suffix(suffix));
        }
        Ok(Self::From { offset, length })
    }

    /// The `(offset, length)` served from a file of `size` bytes; a range past the end is
    /// refused, one that runs over it is cut (as HTTP does).
    pub fn resolve(self, size: u64) -> Result<(u64, u64)> {
        match self {
            Self::Suffix(length) => {
                let length = length.min(size);
                Ok((size - length, length))
            }
            Self::From { offset, .. } if offset > 0 && offset >= size => {
                Err(FilesError::RangeNotSatisfiable { offset, size })
            }
            Self::From { offset, length: 0 } => Ok((offset, size - offset)),
            Self::From { offset, length } => Ok((offset, length.min(size - offset))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: std::fmt::Debug>(result: Result<T>) -> Option<String> {
        aimesh_kit::ServiceError::from(result.expect_err("should be refused")).field
    }

    #[test]
    fn names_refuse_paths_and_keep_the_original() {
        assert_eq!(field_of(FileName::parse("name", "../../etc/passwd")), Some("name".into()));
        assert!(FileName::parse("name", "a\\b.txt").is_err());
        assert!(FileName::parse("name", "..").is_err());
        assert!(FileName::parse("name", "a\u{0}b").is_err());
        assert!(FileName::parse("name", "  ").is_err());
        assert!(FileName::parse("name", &"x".repeat(256)).is_err());
        let name = FileName::parse("name", " Report: Q1?.pdf ").expect("a name");
        assert_eq!(name.original, "Report: Q1?.pdf");
        assert_eq!(name.safe, "Report_ Q1_.pdf");
        assert_eq!(FileName::parse("name", "con.txt").expect("a name").safe, "_con.txt");
        assert_eq!(FileName::parse("name", "...hidden. ").expect("a name").safe, "hidden");
        assert_eq!(FileName::parse("name", "报告.md").expect("a name").safe, "报告.md");
    }

    /// Found by the file_name fuzz target: a safe name kept an ideographic space at its start,
    /// so it was not its own safe name.
    #[test]
    fn safe_names_trim_any_whitespace_and_are_their_own_safe_name() {
        let name = FileName::parse("name", ".\u{3000}.. *").expect("a name");
        assert_eq!(name.safe, "_");
        let name = FileName::parse("name", "a\u{2003}.").expect("a name");
        assert_eq!(name.safe, "a");
        assert_eq!(FileName::parse("name", &name.safe).expect("a name").safe, name.safe);
    }

    /// Found by the file_name fuzz target: a name of 255 characters with a device-name stem got a
    /// safe name of 256, which parse then refused.
    #[test]
    fn a_device_name_stem_at_full_length_keeps_the_safe_name_within_the_limit() {
        let padded = format!("CON{}.t", "\u{3000}".repeat(250));
        let exact = format!("con.{}", "a".repeat(251));
        for name in [padded, exact] {
            assert_eq!(name.chars().count(), MAX_NAME_CHARS);
            let safe = FileName::parse("name", &name).expect("a name").safe;
            assert!(safe.chars().count() <= MAX_NAME_CHARS, "{} characters", safe.chars().count());
            assert!(safe.starts_with("_CON") || safe.starts_with("_con"), "{safe:?}");
            assert_eq!(FileName::parse("name", &safe).expect("the safe name").safe, safe);
        }
        assert_eq!(
            FileName::parse("name", &format!("CON{}.t", "\u{3000}".repeat(250))).expect("a name").safe,
            "_CON.t"
        );
        assert_eq!(FileName::parse("name", "nul \u{3000}.tar.gz").expect("a name").safe, "_nul.tar.gz");
    }

    #[test]
    fn types_and_families() {
        assert_eq!(mime_type("mime_type", "Image/PNG; charset=x").ok().as_deref(), Some("image/png"));
        assert!(mime_type("mime_type", "png").is_err());
        assert!(mime_type("mime_type", "").is_err());
        let allowed = vec!["image/*".to_owned(), "application/pdf".to_owned()];
        assert!(is_allowed("image/webp", &allowed));
        assert!(is_allowed("application/pdf", &allowed));
        assert!(!is_allowed("application/zip", &allowed));
        assert_eq!(family("image/png"), "image");
    }

    #[test]
    fn content_must_match_the_declared_type() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(check_content("image/png", png).is_ok());
        assert!(check_content("application/octet-stream", png).is_ok());
        assert!(check_content("image/jpeg", png).is_err());
        assert!(check_content("text/plain", png).is_err());
        assert!(check_content("image/png", b"hello").is_err());
        assert!(check_content("text/plain", "hello, 世界".as_bytes()).is_ok());
        assert!(check_content("text/plain", &"世".as_bytes()[..2]).is_ok());
        assert!(check_content("application/json", b"{\"a\":\0}").is_err());
        assert!(check_content("application/pdf", b"%PDF-1.7").is_ok());
        assert!(
            check_content("application/vnd.openxmlformats-officedocument.wordprocessingml.document", b"PK\x03\x04")
                .is_ok()
        );
        assert!(check_content("image/webp", b"RIFF\0\0\0\0WEBPVP8 ").is_ok());
        assert!(check_content("image/webp", b"RIFF\0\0\0\0WAVEfmt ").is_err());
        // Found by the mime_sniff fuzz target: text that starts like a binary signature is text.
        assert!(check_content("text/plain", b"BMW service report").is_ok());
        assert!(check_content("text/csv", b"MZ,1\nAB,2\n").is_ok());
        assert!(check_content("text/plain", b"\x7fELF\x02\x01").is_err());
        assert!(check_content("image/bmp", b"BMW service report").is_ok());
        // Unknown formats cannot be checked; a type we know nothing of passes.
        assert!(check_content("application/x-custom", b"\x00\x01").is_ok());
    }

    #[test]
    fn checksums() {
        assert!(sha256("sha256", "").expect("empty is none").is_none());
        assert!(sha256("sha256", &"ab".repeat(32)).expect("valid").is_some());
        assert_eq!(field_of(sha256("sha256", "xyz")), Some("sha256".into()));
    }

    #[test]
    fn ranges() {
        let range = |o, l, s| RangeRequest::parse(o, l, s).expect("valid range");
        assert_eq!(range(0, 0, 0).resolve(10).ok(), Some((0, 10)));
        assert_eq!(range(3, 4, 0).resolve(10).ok(), Some((3, 4)));
        assert_eq!(range(8, 100, 0).resolve(10).ok(), Some((8, 2)));
        assert_eq!(range(0, 0, 4).resolve(10).ok(), Some((6, 4)));
        assert_eq!(range(0, 0, 40).resolve(10).ok(), Some((0, 10)));
        assert_eq!(range(0, 0, 0).resolve(0).ok(), Some((0, 0)));
        assert!(range(10, 0, 0).resolve(10).is_err());
        assert!(RangeRequest::parse(-1, 0, 0).is_err());
        assert!(RangeRequest::parse(1, 0, 2).is_err());
    }
}
