//! Admission control: a request is admitted whole (every payload it frames)
//! or refused before any work is done for it. Two budgets bound what the
//! server holds at once, both taken before decoding starts and given back
//! when the answer is sent: inputs (payloads or images) admitted and not yet
//! answered, and bytes (bodies, decoded images and every intermediate the
//! input pipeline will allocate, dequantised latents).

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per memory permit: keeps permit counts well inside a `u32`.
const UNIT: u64 = 1024;

/// The server's two budgets.
pub(crate) struct Admission {
    inputs: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    max_inputs: usize,
    max_bytes: u64,
}

/// What an admitted request holds until its answer is sent.
pub(crate) struct Ticket {
    _inputs: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

/// Why a request was not admitted.
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// Whether waiting can help (503 + `Retry-After`) or never (413).
    pub retry: bool,
}

impl Admission {
    pub fn new(max_inputs: usize, max_bytes: u64) -> Self {
        // Permits are taken as a u32 at once.
        let max_inputs = max_inputs.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let units = (max_bytes / UNIT).clamp(1, u64::from(u32::MAX)) as usize;
        Self {
            inputs: Arc::new(Semaphore::new(max_inputs)),
            memory: Arc::new(Semaphore::new(units)),
            max_inputs,
            max_bytes: units as u64 * UNIT,
        }
    }

    /// Admits a request of `inputs` inputs needing `bytes` while in flight,
    /// or says why not: 413 when it could never fit, 503 when the server is
    /// busy now.
    pub fn admit(&self, inputs: usize, bytes: u64) -> Result<Ticket, Refusal> {
        let never = |message: String| Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message,
            retry: false,
        };
        let busy = |what: &str| Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the server holds as many {what} as it admits; retry shortly"),
            retry: true,
        };
        if inputs > self.max_inputs {
            return Err(never(format!(
                "{inputs} inputs in one request; this server admits at most {} at once",
                self.max_inputs
            )));
        }
        if bytes > self.max_bytes {
            return Err(never(format!(
                "the request needs {bytes} bytes in flight; this server admits at most {}",
                self.max_bytes
            )));
        }
        let units = bytes.div_ceil(UNIT).max(1) as u32;
        let inputs = self
            .inputs
            .clone()
            .try_acquire_many_owned(inputs as u32)
            .map_err(|_| busy("requests"))?;
        let memory = self
            .memory
            .clone()
            .try_acquire_many_owned(units)
            .map_err(|_| busy("bytes of work"))?;
        Ok(Ticket {
            _inputs: inputs,
            _memory: memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_admitted_whole_or_refused() {
        let admission = Admission::new(256, 1 << 30);
        let full = admission
            .admit(256, 1 << 20)
            .ok()
            .expect("256 inputs fit an idle server");
        let refused = admission.admit(1, 1024).err().expect("no input slot left");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        drop(full);
        assert!(admission.admit(1, 1024).is_ok(), "slots come back with the ticket");
        let never = admission.admit(257, 1024).err().expect("more than the server admits");
        assert_eq!(never.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn bytes_in_flight_are_bounded() {
        let admission = Admission::new(64, 10 << 20);
        let big = admission.admit(1, 8 << 20).ok().expect("fits");
        let busy = admission
            .admit(1, 4 << 20)
            .err()
            .expect("over the byte budget while the first is held");
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        // The refused request took no input slot.
        assert_eq!(admission.inputs.available_permits(), 63);
        drop(big);
        assert!(admission.admit(1, 4 << 20).is_ok());
        assert_eq!(
            admission.admit(1, 11 << 20).err().expect("never fits").status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
