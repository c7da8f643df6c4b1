//! Error kinds: what a caller does about an error, whatever crate made it.

use std::io;

use serde::Serialize;

/// The kind of an error, kept through every crate so that a server maps it
/// to a status code without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image, blob, template, name or file does not exist.
    NotFound,
    /// It exists already (a name taken, a mount point in use).
    AlreadyExists,
    /// Credentials are missing or were refused.
    Unauthorized,
    /// Credentials were accepted but do not allow this.
    Denied,
    /// Bytes do not hash to the digest that named them.
    DigestMismatch,
    /// A media type, compression or format strata does not handle.
    Unsupported,
    /// The request or input is malformed (a bad reference, size, tar, TOC).
    InvalidInput,
    /// Out of disk space (or quota).
    NoSpace,
    /// The operation was cancelled (or ran past its deadline).
    Cancelled,
    /// The thing is in use (mounted, served, locked) and cannot change now.
    Busy,
    /// A registry or other peer could not be reached or kept failing.
    Unavailable,
    /// Anything else: a local I/O failure or a bug.
    Internal,
}

impl ErrorKind {
    /// The HTTP status a service answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Denied => 403,
            ErrorKind::DigestMismatch => 422,
            ErrorKind::Unsupported => 415,
            ErrorKind::InvalidInput => 400,
            ErrorKind::NoSpace => 507,
            // nginx's "client closed request"; the job was stopped
            ErrorKind::Cancelled => 499,
            ErrorKind::Busy => 409,
            ErrorKind::Unavailable => 502,
            ErrorKind::Internal => 500,
        }
    }

    /// The gRPC status code (as numbered in grpc's `code.proto`) a daemon
    /// answers with.
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorKind::Cancelled => 1,
            ErrorKind::InvalidInput | ErrorKind::DigestMismatch => 3,
            ErrorKind::NotFound => 5,
            ErrorKind::AlreadyExists => 6,
            ErrorKind::Denied => 7,
            ErrorKind::NoSpace => 8,
            ErrorKind::Busy => 9,
            ErrorKind::Unsupported => 12,
            ErrorKind::Internal => 13,
            ErrorKind::Unavailable => 14,
            ErrorKind::Unauthorized => 16,
        }
    }

    /// The kind of an I/O error.
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::PermissionDenied => ErrorKind::Denied,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ if is_cancelled(e) => ErrorKind::Cancelled,
            io::ErrorKind::ResourceBusy => ErrorKind::Busy,
            io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable => ErrorKind::Unavailable,
            _ => match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<crate::Cancelled>())
            {
                Some(_) => ErrorKind::Cancelled,
                None => ErrorKind::Internal,
            },
        }
    }
}

fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<crate::Cancelled>().is_some())
}

/// Errors that know their kind.
pub trait HasKind {
    /// What kind of error this is.
    fn kind(&self) -> ErrorKind;
}

impl HasKind for io::Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::of_io(self)
    }
}

impl HasKind for crate::Cancelled {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Cancelled
    }
}

/// Not `ErrorKind::Interrupted`: std's readers retry those forever (a
/// cancelled gzip header read would spin); the kind is found by
/// downcasting instead.
impl From<crate::Cancelled> for io::Error {
    fn from(c: crate::Cancelled) -> io::Error {
        io::Error::other(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_kind() {
        let enospc = io::Error::from_raw_os_error(28);
        assert_eq!(enospc.kind(), io::ErrorKind::StorageFull);
        assert_eq!(HasKind::kind(&enospc), ErrorKind::NoSpace);
        assert_eq!(
            HasKind::kind(&io::Error::from(io::ErrorKind::NotFound)),
            ErrorKind::NotFound
        );
        let c: io::Error = crate::Cancelled.into();
        assert_eq!(HasKind::kind(&c), ErrorKind::Cancelled);
        assert_ne!(
            c.kind(),
            io::ErrorKind::Interrupted,
            "std retries Interrupted reads"
        );
        // a cancelled read makes read_exact fail instead of spinning
        struct Cancelled;
        impl io::Read for Cancelled {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(crate::Cancelled.into())
            }
        }
        let e = io::Read::read_exact(&mut Cancelled, &mut [0u8; 4]).expect_err("fails");
        assert_eq!(HasKind::kind(&e), ErrorKind::Cancelled);
        assert_eq!(HasKind::kind(&io::Error::other("x")), ErrorKind::Internal);
    }

    #[test]
    fn every_kind_has_distinct_enough_codes() {
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::NotFound.grpc_code(), 5);
        assert_eq!(ErrorKind::Cancelled.grpc_code(), 1);
        assert_eq!(ErrorKind::Unauthorized.http_status(), 401);
        assert_eq!(ErrorKind::Unauthorized.grpc_code(), 16);
        assert_eq!(ErrorKind::NoSpace.grpc_code(), 8);
    }
}
