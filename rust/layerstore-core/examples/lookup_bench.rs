//! Rust-side lookup throughput of a tagged image's union index, without Python in the way.
//!
//! Usage: `lookup_bench STORE TAG PATHS_FILE ROUNDS` (one absolute path per line). Prints one
//! JSON object: lookups, seconds, lookups_per_s, found. Used by `benches/test_stack.py`.

use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use layerstore_core::store::StoreOptions;
use layerstore_core::tar::Limits;
use layerstore_core::Store;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, store, tag, paths, rounds] = &args[..] else {
        return Err("usage: lookup_bench STORE TAG PATHS_FILE ROUNDS".into());
    };
    let store = Store::open(Path::new(store), StoreOptions::default(), Limits::default())?;
    let image = store.get(tag)?;
    let paths: Vec<Vec<u8>> = std::io::BufReader::new(std::fs::File::open(paths)?)
        .lines()
        .map(|l| l.map(|l| l.trim_start_matches('/').as_bytes().to_vec()))
        .collect::<Result<_, _>>()?;
    let rounds: usize = rounds.parse()?;
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for p in &paths {
            // What `stat(path, follow_symlinks=False)` does.
            if let Some((_, view)) = image.index.lookup_view(p, false)? {
                found += usize::from(view.meta().size > 0);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let lookups = paths.len() * rounds;
    println!(
        "{{\"lookups\": {lookups}, \"seconds\": {secs}, \"lookups_per_s\": {}, \"found\": {found}}}",
        lookups as f64 / secs
    );
    Ok(())
}
