//! What the two eBPF paths (sockmap and tcpsplice) share: taking programs
//! and maps out of a loaded object, the error for that, waiting on a map's
//! (or any owned) fd with tokio, and their locks.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};

use aya::maps::{Map, MapError};
use aya::programs::{Program, ProgramError};
use aya::Ebpf;
use tokio::io::unix::AsyncFd;

/// Loading an eBPF object, or taking a program or map out of it.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Loading the object failed (no privileges, no BTF, verifier).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching a program failed.
    #[error("eBPF program: {0}")]
    Program(#[from] ProgramError),
    /// A map is missing or has the wrong type.
    #[error("map: {0}")]
    Map(#[from] MapError),
    /// The object lacks a map or program by that name.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

/// Lets `?` turn [`ObjectError`] and each of its sources into a path's
/// error, whose `Object` variant carries it.
macro_rules! from_object_error {
    ($t:ty) => {
        impl From<$crate::datapath::ebpf::ObjectError> for $t {
            fn from(e: $crate::datapath::ebpf::ObjectError) -> Self {
                Self::Object(e)
            }
        }
        impl From<aya::EbpfError> for $t {
            fn from(e: aya::EbpfError) -> Self {
                Self::Object(e.into())
            }
        }
        impl From<aya::programs::ProgramError> for $t {
            fn from(e: aya::programs::ProgramError) -> Self {
                Self::Object(e.into())
            }
        }
        impl From<aya::maps::MapError> for $t {
            fn from(e: aya::maps::MapError) -> Self {
                Self::Object(e.into())
            }
        }
    };
}
pub(super) use from_object_error;

/// The program `name`, as its type.
pub(super) fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, ObjectError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or(ObjectError::Missing(name))?
        .try_into()?)
}

/// The map `name`, taken out of the object (untyped).
pub(super) fn map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, ObjectError> {
    ebpf.take_map(name).ok_or(ObjectError::Missing(name))
}

/// The map `name`, taken out of the object, typed.
pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ObjectError>
where
    T: TryFrom<Map, Error = MapError>,
{
    Ok(map(ebpf, name)?.try_into()?)
}

/// Registers an fd-owning object with tokio for readability.
pub(super) fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: each `T` here owns its fd (a map, an OwnedFd, the logger's
    // ring) and keeps it open and unchanged until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Locks `m`; a poisoned lock still guards consistent data here (every
/// critical section is a single map or table operation).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
