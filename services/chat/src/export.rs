//! Exports: a session as JSON or Markdown, a project's live sessions as a tar archive. Every
//! export streams in chunks of at most [`MAX_CHUNK`] bytes and reads messages a page at a time,
//! so neither side holds a whole session in memory.
//!
//! The JSON document is `{"session": <session>, "messages": [<message>, ...]}` with the fields
//! of [`SessionRow`] and [`MessageRow`]; it holds the messages up to the session's count when
//! the export began, so appends during an export do not make it inconsistent.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tokio::sync::mpsc;
use uuid::Uuid;

use aimesh_kit::wire::pagination::{Cursor, Page};

use crate::error::{ChatError, Result};
use crate::store::{MessageRow, SessionFilter, SessionRow, Store};

/// Largest chunk sent.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Messages (or sessions) read from PostgreSQL at a time.
const PAGE: i64 = 100;
/// Tar entries are 512-byte blocks.
const BLOCK: usize = 512;
/// The largest size an ustar header's 11 octal digits hold.
const MAX_TAR_ENTRY: u64 = 0o777_7777_7777;

/// The two document formats of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Markdown,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Markdown => "text/markdown; charset=utf-8",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Markdown => "md",
        }
    }

    /// The document's opening: everything before the first message.
    fn head(self, session: &SessionRow) -> Result<Vec<u8>> {
        match self {
            Self::Json => {
                let mut out = b"{\"session\":".to_vec();
                serde_json::to_writer(&mut out, session).map_err(aimesh_kit::ServiceError::internal)?;
                out.extend_from_slice(b",\"messages\":[");
                Ok(out)
            }
            Self::Markdown => Ok(markdown_head(session).into_bytes()),
        }
    }

    /// One message; `previous` is the sequence of the message before it in the document.
    fn message(self, message: &MessageRow, previous: Option<&MessageRow>) -> Result<Vec<u8>> {
        match self {
            Self::Json => {
                let mut out = if previous.is_some() { b",".to_vec() } else { Vec::new() };
                serde_json::to_writer(&mut out, message).map_err(aimesh_kit::ServiceError::internal)?;
                Ok(out)
            }
            Self::Markdown => Ok(markdown_message(message, previous).into_bytes()),
        }
    }

    fn tail(self) -> Vec<u8> {
        match self {
            Self::Json => b"]}".to_vec(),
            Self::Markdown => Vec::new(),
        }
    }
}

/// The receiving side went away (the client cancelled): stop quietly.
#[derive(Debug)]
pub struct Gone;

/// Collects bytes and sends them on in chunks of exactly [`MAX_CHUNK`] (the last one shorter).
pub struct ChunkWriter {
    sender: mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for ChunkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkWriter").field("buffered", &self.buffer.len()).finish_non_exhaustive()
    }
}

impl ChunkWriter {
    pub fn new(sender: mpsc::Sender<Vec<u8>>) -> Self {
        Self { sender, buffer: Vec::with_capacity(MAX_CHUNK) }
    }

    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), Gone> {
        while !bytes.is_empty() {
            let room = MAX_CHUNK - self.buffer.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.buffer.extend_from_slice(now);
            bytes = later;
            if self.buffer.len() == MAX_CHUNK {
                let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(MAX_CHUNK));
                self.sender.send(chunk).await.map_err(|_| Gone)?;
            }
        }
        Ok(())
    }

    /// Sends what is buffered.
    pub async fn finish(mut self) -> Result<(), Gone> {
        if !self.buffer.is_empty() {
            let chunk = std::mem::take(&mut self.buffer);
            self.sender.send(chunk).await.map_err(|_| Gone)?;
        }
        Ok(())
    }
}

/// Why an export stopped early.
#[derive(Debug)]
pub enum Stopped {
    Gone,
    Failed(ChatError),
}

impl From<Gone> for Stopped {
    fn from(_: Gone) -> Self {
        Self::Gone
    }
}

impl From<ChatError> for Stopped {
    fn from(error: ChatError) -> Self {
        Self::Failed(error)
    }
}

impl From<sqlx::Error> for Stopped {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(error.into())
    }
}

/// Where a rendered document goes: the client (through a [`ChunkWriter`]), or a byte count.
trait DocumentSink {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), Stopped>;
}

impl DocumentSink for ChunkWriter {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), Stopped> {
        Ok(self.write(bytes).await?)
    }
}

/// Counts what a document would take, keeping nothing.
struct ByteCount(u64);

impl DocumentSink for ByteCount {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), Stopped> {
        self.0 += bytes.len() as u64;
        Ok(())
    }
}

/// Renders `session` (read beforehand) as `format` into `out`, its messages read on `conn` a
/// page at a time.
async fn render_document(
    conn: &mut PgConnection,
    session: &SessionRow,
    format: Format,
    out: &mut impl DocumentSink,
) -> Result<(), Stopped> {
    out.put(&format.head(session)?).await?;
    let mut previous: Option<MessageRow> = None;
    loop {
        let after = previous.as_ref().map_or(0, |m| m.sequence);
        let page = Store::messages_after_in(conn, session.id, after, Some(session.message_count), PAGE).await?;
        let full = page.len() as i64 == PAGE;
        for message in page {
            out.put(&format.message(&message, previous.as_ref())?).await?;
            previous = Some(message);
        }
        if !full {
            break;
        }
    }
    out.put(&format.tail()).await?;
    Ok(())
}

/// Streams one session's document to `out`.
pub async fn export_session(
    store: &Store,
    session: &SessionRow,
    format: Format,
    mut out: ChunkWriter,
) -> Result<(), Stopped> {
    let mut conn = store.pool().acquire().await?;
    render_document(&mut conn, session, format, &mut out).await?;
    out.finish().await?;
    Ok(())
}

/// Streams a tar archive of every live session of `project_id` to `out`: `<id>.json` and
/// `<id>.md` each, session after session. Each session is read in a snapshot (repeatable read)
/// since a tar header states the size before the content: a purge or an update between the
/// measuring pass and the writing pass must not change what is written.
pub async fn export_project(store: &Store, project_id: Uuid, mut out: ChunkWriter) -> Result<(), Stopped> {
    let filter = SessionFilter::default();
    let mut page = Page::first(PAGE);
    loop {
        let rows = store.list_sessions(project_id, &filter, &page).await?;
        let (sessions, next) = page.split(rows, |last| Cursor { time: last.created_at, id: last.id });
        for listed in &sessions {
            let mut tx = store.pool().begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
            // Re-read in the snapshot: the listing is older, and the session may be gone.
            let Some(session) = Store::session_in(&mut tx, listed.id).await?.filter(|s| !s.is_deleted()) else {
                continue;
            };
            for format in [Format::Json, Format::Markdown] {
                let mut size = ByteCount(0);
                render_document(&mut tx, &session, format, &mut size).await?;
                let size = size.0;
                if size > MAX_TAR_ENTRY {
                    return Err(Stopped::Failed(
                        aimesh_kit::ServiceError::internal("a session export over 8 GiB").into(),
                    ));
                }
                let name = format!("{}.{}", session.id, format.extension());
                out.write(&tar_header(&name, size, session.updated_at)).await?;
                render_document(&mut tx, &session, format, &mut out).await?;
                out.write(&vec![0; padding(size)]).await?;
            }
            tx.commit().await?;
        }
        match next {
            Some(next) => page = next,
            None => break,
        }
    }
    // The end of an archive: two zero blocks.
    out.write(&[0; 2 * BLOCK]).await?;
    out.finish().await?;
    Ok(())
}

/// Zero bytes after an entry of `size` bytes up to the next block.
fn padding(size: u64) -> usize {
    let rest = (size % BLOCK as u64) as usize;
    if rest == 0 { 0 } else { BLOCK - rest }
}

/// A POSIX ustar header of a regular file (names here are ASCII and under 100 bytes).
pub fn tar_header(name: &str, size: u64, modified: DateTime<Utc>) -> [u8; BLOCK] {
    fn octal(field: &mut [u8], value: u64) {
        let digits = field.len() - 1;
        let text = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
        field[digits] = 0;
    }
    let mut header = [0u8; BLOCK];
    let name = name.as_bytes();
    header[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    octal(&mut header[100..108], 0o644);
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], size);
    octal(&mut header[136..148], u64::try_from(modified.timestamp()).unwrap_or(0));
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[265..271].copy_from_slice(b"aimesh");
    header[297..303].copy_from_slice(b"aimesh");
    // The checksum is computed with its own field as spaces.
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    let checksum = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(checksum.as_bytes());
    header
}

fn markdown_head(session: &SessionRow) -> String {
    let title = if session.title.is_empty() { "Untitled session" } else { session.title.as_str() };
    let mut out = format!(
        "# {title}\n\n- Session: `{}`\n- Model: `{}`\n- Created: {}\n- Messages: {} · Tokens: {}\n",
        session.id,
        session.model,
        session.created_at.to_rfc3339(),
        session.message_count,
        session.total_tokens,
    );
    if !session.system_prompt.is_empty() {
        out.push_str("\n## System prompt\n\n");
        for line in session.system_prompt.lines() {
            out.push_str("> ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("\n---\n");
    out
}

fn markdown_message(message: &MessageRow, previous: Option<&MessageRow>) -> String {
    let role = match message.role.as_str() {
        "system" => "System",
        "user" => "User",
        "assistant" => "Assistant",
        "tool" => "Tool",
        other => other,
    };
    let mut out = format!("\n### {} · {role} · {}\n\n", message.sequence, message.created_at.to_rfc3339());
    // A message that does not follow the one above starts a branch: say where it hangs.
    let follows = match (message.parent_message_id, previous) {
        (None, None) => true,
        (Some(parent), Some(previous)) => parent == previous.id,
        _ => false,
    };
    if !follows {
        match message.parent_message_id {
            Some(parent) => out.push_str(&format!("*(a reply to message `{parent}`)*\n\n")),
            None => out.push_str("*(a new conversation root)*\n\n"),
        }
    }
    match message.content_type.as_str() {
        "text" | "markdown" | "html" => out.push_str(&message.content),
        language => {
            // A fence longer than any run of backticks inside, so the content cannot close it.
            let longest = message.content.split(|c| c != '`').map(str::len).max().unwrap_or(0);
            let fence = "`".repeat(longest.max(2) + 1);
            let language = if language == "code" { "" } else { language };
            out.push_str(&format!("{fence}{language}\n{}\n{fence}", message.content));
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_checksum_and_sizes() {
        let header = tar_header("a.json", 1234, Utc::now());
        let stored = std::str::from_utf8(&header[148..154]).expect("ascii");
        let mut blank = header;
        blank[148..156].fill(b' ');
        let sum: u32 = blank.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).expect("octal"), sum);
        assert_eq!(std::str::from_utf8(&header[124..135]).expect("ascii"), "00000002322");
        assert_eq!(padding(512), 0);
        assert_eq!(padding(513), 511);
    }

    #[tokio::test]
    async fn chunks_are_at_most_64_kib() {
        let (sender, mut receiver) = mpsc::channel(16);
        let mut writer = ChunkWriter::new(sender);
        let task = tokio::spawn(async move {
            writer.write(&vec![1; MAX_CHUNK + 10]).await.expect("write");
            writer.write(&[2; 5]).await.expect("write");
            writer.finish().await.expect("finish");
        });
        let mut sizes = Vec::new();
        while let Some(chunk) = receiver.recv().await {
            sizes.push(chunk.len());
        }
        task.await.expect("writer");
        assert_eq!(sizes, vec![MAX_CHUNK, 15]);
    }
}
