//! Compile the vendored containerd protos (proto/, see its README) with
//! protox (no protoc) into tonic server and client code.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "github.com/containerd/containerd/api/services/content/v1/content.proto",
    "github.com/containerd/containerd/api/services/images/v1/images.proto",
    "github.com/containerd/containerd/api/services/leases/v1/leases.proto",
    "github.com/containerd/containerd/api/services/version/v1/version.proto",
    "github.com/containerd/containerd/api/types/mount.proto",
    "github.com/containerd/containerd/api/types/descriptor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let mut c = protox::Compiler::new([&dir])?;
    // the types of imports are needed; comments are not (they would turn
    // into doc tests)
    c.include_imports(true).include_source_info(false);
    c.open_files(FILES)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("containerd_api.rs")
        .compile_fds(c.file_descriptor_set())?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
