//! Compiles every .proto under `aimesh/` into Rust and writes the file descriptor set that the
//! servers publish through gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos = Vec::new();
    collect_protos(PathBuf::from("aimesh"), &mut protos)?;
    protos.sort();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // File chunks as `bytes::Bytes`, so a chunk is a slice of the buffer it arrived in (or of
        // the object store's read) rather than a copy into a `Vec` per message.
        .bytes(".aimesh.files.v1.UploadRequest.chunk")
        .bytes(".aimesh.files.v1.DownloadResponse.chunk")
        .file_descriptor_set_path(out_dir.join("aimesh_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from(".")])?;
    println!("cargo:rerun-if-changed=aimesh");
    Ok(())
}

fn collect_protos(dir: PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
