//! A file system that loses, at a power cut, everything that was not
//! synced: the way storage engines are tested. `kill -9` keeps the page
//! cache, so only a file system like this one shows an index made durable
//! before the bytes it points to, or a tree renamed into place before its
//! files were written out.
//!
//! It lives in memory and is served over FUSE. Every operation changes the
//! live tree. What survives a cut is the durable tree, which only syncs
//! change, as a strict reading of POSIX allows and LazyFS models:
//! - `fsync` (or `fdatasync`) of a file makes its contents and mode
//!   durable, not any name for it;
//! - `fsync` of a directory makes its entries durable; an entry's inode
//!   that was never synced survives empty (a file of no bytes, a directory
//!   of no entries), as a journal that committed the name but not the data
//!   leaves it.
//!
//! [`CutFs::arm`] picks the operation at which the power goes (a seeded
//! point in a run); [`CutFs::cut`] then unmounts, drops what was not
//! durable at that point, and mounts again. Mounting needs root and
//! `/dev/fuse`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const ROOT: u64 = 1;
/// Attributes are never cached by the kernel: every look goes to the tree.
const TTL: Duration = Duration::ZERO;

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(PathBuf),
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    perm: u16,
    nlink: u32,
    mtime: SystemTime,
}

impl Node {
    fn new(kind: Kind, perm: u16) -> Self {
        Self {
            kind,
            perm,
            nlink: 1,
            mtime: SystemTime::now(),
        }
    }

    /// What of this inode a directory sync makes durable when the inode
    /// itself was never synced: its kind and mode, no contents.
    fn bare(&self) -> Self {
        let kind = match &self.kind {
            Kind::File(_) => Kind::File(Vec::new()),
            Kind::Dir(_) => Kind::Dir(BTreeMap::new()),
            Kind::Symlink(t) => Kind::Symlink(t.clone()),
        };
        Self {
            kind,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug)]
struct Tree {
    nodes: HashMap<u64, Node>,
    next: u64,
}

impl Tree {
    fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir(BTreeMap::new()), 0o755));
        Self {
            nodes,
            next: ROOT + 1,
        }
    }
}

#[derive(Debug)]
struct State {
    live: Tree,
    durable: Tree,
    /// Operations that change something, counted.
    ops: u64,
    /// The operation after which the power goes.
    cut_after: Option<u64>,
    /// The durable tree when the power went.
    frozen: Option<Tree>,
    /// Whether [`CutFs::cut`] lets the operations stalled since the power
    /// went go on (into a tree about to be dropped).
    released: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// The file system served over FUSE.
struct Served(Shared);

/// A mounted power-cut file system.
pub struct CutFs {
    shared: Shared,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl CutFs {
    /// Mounts an empty file system at `mountpoint` (an empty directory).
    pub fn mount(mountpoint: &Path) -> std::io::Result<Self> {
        let state = State {
            live: Tree::new(),
            durable: Tree::new(),
            ops: 0,
            cut_after: None,
            frozen: None,
            released: false,
        };
        let mut fs = Self {
            shared: Arc::new((Mutex::new(state), Condvar::new())),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.spawn()?;
        Ok(fs)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("cutfs".into())];
        let session = fuser::spawn_mount(Served(self.shared.clone()), &self.mountpoint, &config)?;
        self.session = Some(session);
        Ok(())
    }

    /// Whether this machine can mount it: root, with `/dev/fuse`.
    pub fn available() -> bool {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        euid == 0 && Path::new("/dev/fuse").exists()
    }

    /// Operations that changed something so far.
    pub fn ops(&self) -> u64 {
        self.shared.0.lock().unwrap().ops
    }

    /// The power goes after `ops` more changing operations: from then on
    /// every operation stalls until [`CutFs::cut`], and nothing more
    /// becomes durable.
    pub fn arm(&self, ops: u64) {
        let mut s = self.shared.0.lock().unwrap();
        s.cut_after = Some(s.ops + ops.max(1));
        s.frozen = None;
    }

    /// Waits (at most `limit`) until the armed point is reached; false if
    /// it was not.
    pub fn wait_for_cut(&self, limit: Duration) -> bool {
        let (lock, cv) = &*self.shared;
        let guard = lock.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, limit, |s| s.frozen.is_none())
            .unwrap();
        guard.frozen.is_some()
    }

    /// Lets the operations stalled since the power went go on, into a tree
    /// the cut drops. Call it once the processes using the mount are
    /// killed: one killed in the middle of a request waits for its answer.
    pub fn release(&self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().released = true;
        cv.notify_all();
    }

    /// Cuts the power: unmounts, keeps only what was durable at the armed
    /// point (or now, if it was not reached), and mounts again. Stop the
    /// processes using the mount first.
    pub fn cut(&mut self) -> std::io::Result<()> {
        self.release();
        if let Some(session) = self.session.take() {
            unmount(session)?;
        }
        {
            let mut s = self.shared.0.lock().unwrap();
            let mut survivor = s.frozen.take().unwrap_or_else(|| s.durable.clone());
            // New inodes take numbers no inode ever had: the durable tree
            // may hold inodes numbered past its own counter (a synced file
            // whose directory was not).
            survivor.next = s.live.next;
            s.live = survivor.clone();
            s.durable = survivor;
            s.cut_after = None;
            s.released = false;
        }
        self.spawn()
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = unmount(session);
        }
    }
}

/// Unmounts and waits for the session's thread. The thread ends with
/// ECONNABORTED when the kernel drops the connection at the unmount,
/// which is how it should end.
fn unmount(session: fuser::BackgroundSession) -> std::io::Result<()> {
    match session.umount_and_join() {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        other => other,
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let (kind, size) = match &n.kind {
        Kind::File(d) => (FileType::RegularFile, d.len() as u64),
        Kind::Dir(e) => (FileType::Directory, e.len() as u64),
        Kind::Symlink(t) => (FileType::Symlink, t.as_os_str().len() as u64),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind,
        perm: n.perm,
        nlink: n.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn kind_of(n: &Node) -> FileType {
    match n.kind {
        Kind::File(_) => FileType::RegularFile,
        Kind::Dir(_) => FileType::Directory,
        Kind::Symlink(_) => FileType::Symlink,
    }
}

impl Served {
    /// Runs `f` on the state; counts it as a changing operation when
    /// `changes`, freezing the durable tree at the armed point. Once the
    /// power has gone every operation stalls until the cut, as on a dead
    /// machine: nothing a process does after that point, and nothing it
    /// says it did, can depend on it.
    fn with<T>(&self, changes: bool, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, cv) = &*self.0;
        let mut s = cv
            .wait_while(lock.lock().unwrap(), |s| s.frozen.is_some() && !s.released)
            .unwrap();
        let out = f(&mut s);
        if changes {
            s.ops += 1;
            if s.cut_after == Some(s.ops) && s.frozen.is_none() {
                s.frozen = Some(s.durable.clone());
                cv.notify_all();
            }
        }
        out
    }

    /// Adds `node` as `name` in `parent`; its attributes.
    fn add(&self, parent: INodeNo, name: &OsStr, node: Node) -> Result<FileAttr, Errno> {
        self.with(true, |s| {
            let ino = s.live.next;
            let Some(Node {
                kind: Kind::Dir(entries),
                ..
            }) = s.live.nodes.get_mut(&parent.0)
            else {
                return Err(Errno::ENOTDIR);
            };
            if entries.contains_key(name) {
                return Err(Errno::EEXIST);
            }
            entries.insert(name.to_os_string(), ino);
            s.live.next += 1;
            let a = attr(ino, &node);
            s.live.nodes.insert(ino, node);
            Ok(a)
        })
    }

    /// Removes `name` from `parent`; `dir` says which kind it must be.
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        self.with(true, |s| {
            let child = match s.live.nodes.get(&parent.0) {
                Some(Node {
                    kind: Kind::Dir(e), ..
                }) => *e.get(name).ok_or(Errno::ENOENT)?,
                _ => return Err(Errno::ENOTDIR),
            };
            match (&s.live.nodes[&child].kind, dir) {
                (Kind::Dir(e), true) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                (Kind::Dir(_), false) => return Err(Errno::EISDIR),
                (Kind::Dir(_), true) => {}
                (_, true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
            if let Some(Node {
                kind: Kind::Dir(e), ..
            }) = s.live.nodes.get_mut(&parent.0)
            {
                e.remove(name);
            }
            let n = s.live.nodes.get_mut(&child).expect("an entry's inode");
            n.nlink = n.nlink.saturating_sub(1);
            Ok(())
        })
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Served {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.with(false, |s| match s.live.nodes.get(&parent.0) {
            Some(Node {
                kind: Kind::Dir(e), ..
            }) => {
                let ino = *e.get(name).ok_or(Errno::ENOENT)?;
                Ok(attr(ino, &s.live.nodes[&ino]))
            }
            _ => Err(Errno::ENOTDIR),
        });
        reply_entry(reply, r);
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(false, |s| s.live.nodes.get(&ino.0).map(|n| attr(ino.0, n))) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _: Option<u32>,
        _: Option<u32>,
        size: Option<u64>,
        _: Option<TimeOrNow>,
        _: Option<TimeOrNow>,
        _: Option<SystemTime>,
        _: Option<FileHandle>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.with(true, |s| {
            let n = s.live.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(m) = mode {
                n.perm = (m & 0o7777) as u16;
            }
            if let (Some(len), Kind::File(d)) = (size, &mut n.kind) {
                d.resize(len as usize, 0);
            }
            n.mtime = SystemTime::now();
            Ok(attr(ino.0, n))
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.with(false, |s| match s.live.nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::Symlink(t)) => Ok(t.as_os_str().as_encoded_bytes().to_vec()),
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let node = Node::new(Kind::Dir(BTreeMap::new()), (mode & !umask & 0o7777) as u16);
        reply_entry(reply, self.add(parent, name, node));
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, false));
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, true));
    }

    fn symlink(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let node = Node::new(Kind::Symlink(target.to_path_buf()), 0o777);
        reply_entry(reply, self.add(parent, name, node));
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.with(true, |s| {
            let entry = |s: &State, dir: u64, name: &OsStr| match s.live.nodes.get(&dir) {
                Some(Node {
                    kind: Kind::Dir(e), ..
                }) => Ok(e.get(name).copied()),
                _ => Err(Errno::ENOTDIR),
            };
            let moved = entry(s, parent.0, name)?.ok_or(Errno::ENOENT)?;
            if let Some(old) = entry(s, newparent.0, newname)? {
                if old == moved {
                    return Ok(());
                }
                match (&s.live.nodes[&old].kind, &s.live.nodes[&moved].kind) {
                    (Kind::Dir(e), Kind::Dir(_)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    (Kind::Dir(_), Kind::Dir(_)) => {}
                    (Kind::Dir(_), _) => return Err(Errno::EISDIR),
                    (_, Kind::Dir(_)) => return Err(Errno::ENOTDIR),
                    _ => {}
                }
                let n = s.live.nodes.get_mut(&old).expect("an entry's inode");
                n.nlink = n.nlink.saturating_sub(1);
            }
            for (dir, name, to) in [(parent.0, name, None), (newparent.0, newname, Some(moved))] {
                if let Some(Node {
                    kind: Kind::Dir(e), ..
                }) = s.live.nodes.get_mut(&dir)
                {
                    match to {
                        None => e.remove(name),
                        Some(ino) => e.insert(name.to_os_string(), ino),
                    };
                }
            }
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.with(true, |s| {
            if !matches!(
                s.live.nodes.get(&ino.0).map(|n| &n.kind),
                Some(Kind::File(_))
            ) {
                return Err(Errno::EPERM);
            }
            match s.live.nodes.get_mut(&newparent.0) {
                Some(Node {
                    kind: Kind::Dir(e), ..
                }) => {
                    if e.contains_key(newname) {
                        return Err(Errno::EEXIST);
                    }
                    e.insert(newname.to_os_string(), ino.0);
                }
                _ => return Err(Errno::ENOTDIR),
            }
            let n = s.live.nodes.get_mut(&ino.0).expect("checked");
            n.nlink += 1;
            Ok(attr(ino.0, n))
        });
        reply_entry(reply, r);
    }

    fn open(&self, _: &Request, _: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.with(false, |s| match s.live.nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::File(d)) => {
                let start = (offset as usize).min(d.len());
                let end = (start + size as usize).min(d.len());
                Ok(d[start..end].to_vec())
            }
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.with(true, |s| match s.live.nodes.get_mut(&ino.0) {
            Some(Node {
                kind: Kind::File(d),
                mtime,
                ..
            }) => {
                let end = offset as usize + data.len();
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[offset as usize..end].copy_from_slice(data);
                *mtime = SystemTime::now();
                Ok(data.len() as u32)
            }
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let r = self.with(true, |s| {
            let n = s.live.nodes.get(&ino.0).ok_or(Errno::ENOENT)?.clone();
            s.durable.nodes.insert(ino.0, n);
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn readdir(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.with(false, |s| match s.live.nodes.get(&ino.0) {
            Some(Node {
                kind: Kind::Dir(e), ..
            }) => {
                let mut list = vec![
                    (ino.0, FileType::Directory, OsString::from(".")),
                    (ROOT, FileType::Directory, OsString::from("..")),
                ];
                list.extend(
                    e.iter()
                        .map(|(name, i)| (*i, kind_of(&s.live.nodes[i]), name.clone())),
                );
                Ok(list)
            }
            _ => Err(Errno::ENOTDIR),
        });
        match r {
            Ok(list) => {
                for (i, (ino, kind, name)) in list.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let r = self.with(true, |s| {
            let n = s.live.nodes.get(&ino.0).ok_or(Errno::ENOENT)?.clone();
            if let Kind::Dir(entries) = &n.kind {
                for child in entries.values() {
                    if !s.durable.nodes.contains_key(child) {
                        let bare = s.live.nodes[child].bare();
                        s.durable.nodes.insert(*child, bare);
                    }
                }
            }
            s.durable.nodes.insert(ino.0, n);
            s.durable.next = s.durable.next.max(s.live.next);
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        // 64 GiB free in 4 KiB blocks, plenty of inodes.
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _: &Request, _: INodeNo, _: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _: i32,
        reply: ReplyCreate,
    ) {
        let node = Node::new(Kind::File(Vec::new()), (mode & !umask & 0o7777) as u16);
        match self.add(parent, name, node) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.with(true, |s| match s.live.nodes.get_mut(&ino.0) {
            Some(Node {
                kind: Kind::File(d),
                ..
            }) => {
                let end = (offset + length) as usize;
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && d.len() < end {
                    d.resize(end, 0);
                }
                Ok(())
            }
            _ => Err(Errno::ENOENT),
        });
        reply_empty(reply, r);
    }
}
