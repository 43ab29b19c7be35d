//! Chunk bodies in append-only pack files, beside the RocksDB index.
//!
//! A record is the chunk's hash (32 bytes), its encoding flag (1), its
//! stored length (u32 LE) and the stored bytes; the index (in RocksDB)
//! points at records by pack id and offset. Packing threads append whole
//! batches with one `write` each, to packs of their own, so they never wait
//! on each other or on a database flush; BLAKE3 checks every chunk on every
//! read, so the files carry no checksums of their own.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use convoy_chunker::{ChunkHash, ChunkRef, Encoding, StoredChunk, MAX_CHUNK_SIZE};

/// Bytes of a record before the stored bytes.
pub(super) const RECORD_HEADER: u64 = 32 + 1 + 4;
/// A pack is closed for appends once it is this large.
const MAX_PACK_BYTES: u64 = 512 << 20;
/// Writeback of a pack is started (not awaited) every this many bytes, so
/// the disk works while packing goes on and the final sync has little left.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Read handles kept open; more are closed and reopened on demand.
const MAX_OPEN_READERS: usize = 256;

/// Where one chunk's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Location {
    pub pack: u32,
    pub offset: u64,
}

struct OpenPack {
    id: u32,
    file: File,
    len: u64,
    /// Bytes whose writeback has been started.
    kicked: u64,
}

/// The pack files of one store.
pub(super) struct Packs {
    dir: PathBuf,
    next_id: AtomicU32,
    /// Packs open for appending that no writer is using right now.
    idle: Mutex<Vec<OpenPack>>,
    /// Packs written since the last [`Packs::sync`].
    dirty: Mutex<BTreeSet<u32>>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// Packs with lower ids are sealed (see [`Packs::seal`]).
    sealed_below: AtomicU32,
    /// Packs a writer holds, from its append until its index entries are
    /// filed (see [`Writing`]).
    writing: Mutex<BTreeSet<u32>>,
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicBool,
}

/// A pack being written: while it lives, compaction leaves the pack alone.
pub(super) struct Writing<'a> {
    packs: &'a Packs,
    id: u32,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.packs
            .writing
            .lock()
            .expect("writing set poisoned")
            .remove(&self.id);
    }
}

fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

fn pack_id(name: &str) -> Option<u32> {
    name.strip_suffix(".pack")?.parse().ok()
}

fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Asks the kernel to start writing a range to disk without waiting; a
/// hint only, so its failure is ignored (the sync at flush is what counts).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; no memory is shared.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

impl Packs {
    /// Opens (creating) the pack directory; new packs get ids after the
    /// highest present.
    pub fn open(dir: &Path) -> io::Result<Self> {
        crate::durable::create_dir_all(dir)?;
        let mut next = 0;
        for entry in fs::read_dir(dir)? {
            if let Some(id) = entry?.file_name().to_str().and_then(pack_id) {
                next = next.max(id + 1);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            next_id: AtomicU32::new(next),
            idle: Mutex::new(Vec::new()),
            dirty: Mutex::new(BTreeSet::new()),
            readers: Mutex::new(HashMap::new()),
            sealed_below: AtomicU32::new(0),
            writing: Mutex::new(BTreeSet::new()),
            #[cfg(test)]
            fail_syncs: Default::default(),
        })
    }

    /// The ids of every pack file present.
    pub fn ids(&self) -> io::Result<Vec<u32>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            if let Some(id) = entry?.file_name().to_str().and_then(pack_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Appends `chunks` to one pack with one write; returns where each
    /// went, and a guard that keeps [`Packs::seal`]'s caller away from the
    /// pack until the caller has filed the index entries and drops it.
    pub fn append(
        &self,
        chunks: &[(ChunkRef, StoredChunk)],
    ) -> io::Result<(Vec<Location>, Writing<'_>)> {
        // A pack is taken from the pool, or a new one's id taken, and
        // marked as written to, all under the pool's lock, under which
        // `seal` reads the id bound and the packs being written. A new
        // id marked outside it let a seal in between see a pack below its
        // bound that no writer held: compaction found no index entries in
        // it and removed it under the writer, whose entries then pointed
        // into a pack that was gone.
        let (popped, id) = {
            let mut idle = self.idle.lock().expect("pack pool poisoned");
            let p = idle.pop();
            let id = match &p {
                Some(p) => p.id,
                None => self.next_id.fetch_add(1, Ordering::SeqCst),
            };
            self.mark_writing(id);
            (p, id)
        };
        // Dropped on every return: the pack is no longer being written.
        let writing = Writing { packs: self, id };
        let mut pack = match popped {
            Some(p) => p,
            None => self.create(id)?,
        };
        // Headers and bodies go out in one vectored write: no copy of the
        // bodies into a batch buffer.
        let mut headers = Vec::with_capacity(chunks.len());
        let mut locations = Vec::with_capacity(chunks.len());
        let mut offset = pack.len;
        for (chunk, stored) in chunks {
            let mut h = [0u8; RECORD_HEADER as usize];
            h[..32].copy_from_slice(&chunk.hash.0);
            h[32] = stored.encoding.flag();
            h[33..].copy_from_slice(&(stored.bytes.len() as u32).to_le_bytes());
            headers.push(h);
            locations.push(Location {
                pack: pack.id,
                offset,
            });
            offset += RECORD_HEADER + stored.bytes.len() as u64;
        }
        let mut slices: Vec<IoSlice> = headers
            .iter()
            .zip(chunks)
            .flat_map(|(h, (_, stored))| [IoSlice::new(h), IoSlice::new(&stored.bytes)])
            .collect();
        // On failure the file may hold part of the batch: `pack` is dropped,
        // never appended to again, and the index never points past its end.
        write_all_vectored(&mut pack.file, &mut slices)?;
        pack.len = offset;
        if pack.len - pack.kicked >= WRITEBACK_STEP {
            start_writeback(&pack.file, pack.kicked, pack.len - pack.kicked);
            pack.kicked = pack.len;
        }
        self.dirty
            .lock()
            .expect("dirty set poisoned")
            .insert(pack.id);
        // A sealed pack is not appended to again: compaction may take it.
        if pack.len < MAX_PACK_BYTES && pack.id >= self.sealed_below.load(Ordering::SeqCst) {
            self.idle.lock().expect("pack pool poisoned").push(pack);
        }
        Ok((locations, writing))
    }

    fn mark_writing(&self, id: u32) {
        self.writing
            .lock()
            .expect("writing set poisoned")
            .insert(id);
    }

    /// Seals every pack there is: none is appended to again. Returns the
    /// sealed ids' bound (every id below it is sealed) and the packs a
    /// writer still holds, which compaction must leave alone this time.
    pub fn seal(&self) -> (u32, BTreeSet<u32>) {
        let mut idle = self.idle.lock().expect("pack pool poisoned");
        let below = self.next_id.load(Ordering::SeqCst);
        self.sealed_below.store(below, Ordering::SeqCst);
        idle.clear();
        let busy = self.writing.lock().expect("writing set poisoned").clone();
        (below, busy)
    }

    fn create(&self, id: u32) -> io::Result<OpenPack> {
        let file = File::options()
            .append(true)
            .create_new(true)
            .open(self.dir.join(pack_name(id)))?;
        Ok(OpenPack {
            id,
            file,
            len: 0,
            kicked: 0,
        })
    }

    /// Reads the record at `at`, checking it is `hash`'s.
    pub fn read(
        &self,
        hash: &ChunkHash,
        at: Location,
        stored_len: u32,
    ) -> Result<StoredChunk, String> {
        // A stored chunk is never larger than the chunk (compression is kept
        // only when it saves): a larger length is a corrupt index entry.
        if stored_len as usize > MAX_CHUNK_SIZE {
            return Err(format!("index gives an impossible length {stored_len}"));
        }
        let file = self
            .reader(at.pack)
            .map_err(|e| format!("pack {}: {e}", pack_name(at.pack)))?;
        let mut buf = vec![0u8; RECORD_HEADER as usize + stored_len as usize];
        file.read_exact_at(&mut buf, at.offset)
            .map_err(|e| format!("pack {} at {}: {e}", pack_name(at.pack), at.offset))?;
        let (header, bytes) = buf.split_at(RECORD_HEADER as usize);
        if header[..32] != hash.0 {
            return Err(format!(
                "pack {} at {}: record names another chunk",
                pack_name(at.pack),
                at.offset
            ));
        }
        let len = u32::from_le_bytes(header[33..37].try_into().expect("4 bytes"));
        let encoding = Encoding::from_flag(header[32]);
        match encoding {
            Some(encoding) if len == stored_len => Ok(StoredChunk {
                encoding,
                bytes: bytes.to_vec(),
            }),
            _ => Err(format!(
                "pack {} at {}: corrupt record header",
                pack_name(at.pack),
                at.offset
            )),
        }
    }

    fn reader(&self, id: u32) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().expect("reader cache poisoned");
        if let Some(f) = readers.get(&id) {
            return Ok(f.clone());
        }
        if readers.len() >= MAX_OPEN_READERS {
            readers.clear();
        }
        let f = Arc::new(File::open(self.dir.join(pack_name(id)))?);
        readers.insert(id, f.clone());
        Ok(f)
    }

    /// Makes every pack written since the last sync durable, and the
    /// directory entries of new packs. On failure the packs stay dirty: a
    /// failed fsync may have dropped pages it could not write, so the
    /// caller must not count anything in them as durable (see
    /// [`RocksStore`](super::RocksStore), which stops taking writes).
    pub fn sync(&self) -> io::Result<()> {
        let dirty = std::mem::take(&mut *self.dirty.lock().expect("dirty set poisoned"));
        let synced = self.sync_packs(&dirty);
        if synced.is_err() {
            self.dirty.lock().expect("dirty set poisoned").extend(dirty);
        }
        synced
    }

    fn sync_packs(&self, ids: &BTreeSet<u32>) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs.load(std::sync::atomic::Ordering::SeqCst) && !ids.is_empty() {
            return Err(io::Error::other("injected fsync failure"));
        }
        for id in ids {
            File::open(self.dir.join(pack_name(*id)))?.sync_data()?;
        }
        if !ids.is_empty() {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Makes every later [`Packs::sync`] of a dirty pack fail, as a disk
    /// that cannot write would.
    #[cfg(test)]
    pub fn fail_syncs(&self) {
        self.fail_syncs
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Removes a pack file (after its live records moved elsewhere).
    pub fn remove(&self, id: u32) -> io::Result<()> {
        self.dirty.lock().expect("dirty set poisoned").remove(&id);
        self.readers
            .lock()
            .expect("reader cache poisoned")
            .remove(&id);
        self.idle
            .lock()
            .expect("pack pool poisoned")
            .retain(|p| p.id != id);
        fs::remove_file(self.dir.join(pack_name(id)))
    }

    /// Size of a pack file.
    pub fn len(&self, id: u32) -> io::Result<u64> {
        Ok(fs::metadata(self.dir.join(pack_name(id)))?.len())
    }
}
