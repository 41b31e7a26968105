//! A minimal Hugging Face hub on 127.0.0.1 for tests: serves one folder as `ORG/NAME` in the hub's
//! URL layout (`/api/models/ORG/NAME/revision/REV` and `/ORG/NAME/resolve/REV/FILE`, with the
//! `Range`, `ETag`, `X-Repo-Commit` and `Content-Range` headers the hf-hub client relies on).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct HubServer {
    pub endpoint: String,
    /// Number of file bodies served (GET without `bytes=0-0`).
    pub downloads: Arc<AtomicUsize>,
}

pub fn start(repo: &str, folder: PathBuf) -> HubServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let downloads = Arc::new(AtomicUsize::new(0));
    let (repo, d2) = (repo.to_string(), downloads.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (repo, folder, d) = (repo.clone(), folder.clone(), d2.clone());
            std::thread::spawn(move || {
                let _ = serve(stream, &repo, &folder, &d);
            });
        }
    });
    HubServer {
        endpoint,
        downloads,
    }
}

fn serve(
    mut stream: TcpStream,
    repo: &str,
    folder: &std::path::Path,
    downloads: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<(u64, Option<u64>)> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let v = v.trim();
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            range = Some((a.parse().unwrap_or(0), b.parse().ok()));
        }
    }
    let api = format!("/api/models/{repo}/revision/");
    let resolve = format!("/{repo}/resolve/");
    if let Some(_rev) = path.strip_prefix(&api) {
        let mut names: Vec<String> = std::fs::read_dir(folder)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let siblings: Vec<String> = names
            .iter()
            .map(|n| format!("{{\"rfilename\":\"{n}\"}}"))
            .collect();
        let body = format!(
            "{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }
    if let Some(rest) = path.strip_prefix(&resolve) {
        let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
        if let Ok(bytes) = std::fs::read(folder.join(file)) {
            let total = bytes.len() as u64;
            let (a, b) = range.unwrap_or((0, None));
            let b = b
                .unwrap_or(total.saturating_sub(1))
                .min(total.saturating_sub(1));
            let body = &bytes[a as usize..=b as usize];
            if !(a == 0 && b == 0) {
                downloads.fetch_add(1, Ordering::SeqCst);
            }
            let etag = blake3::hash(&bytes).to_hex();
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{total}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            return stream.write_all(body);
        }
    }
    write!(
        stream,
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}
