//! Groups concurrent appends into one round trip. One task, fed by a
//! bounded queue, takes everything waiting (up to a batch limit) and hands
//! it on at once, in arrival order. It never waits for company: a lone
//! append goes out as soon as the task sees it, so latency at low load is
//! one round trip, as without batching.
use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// Sends one batch and answers each job, in order.
pub(crate) trait Flush: Send + 'static {
    /// One queued unit of work.
    type Job: Send + 'static;
    /// Its answer.
    type Out: Send + 'static;
    /// Runs `jobs` in order and returns one answer per job, in the same
    /// order; a failing job must not fail the others.
    fn flush(&mut self, jobs: Vec<Self::Job>) -> impl Future<Output = Vec<Self::Out>> + Send;
}

/// Why a job was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its limit of jobs.
    Full,
    /// The batching task is gone (the job may or may not have run).
    Stopped,
}

/// Limits of a [`Batcher`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Jobs waiting at most; beyond, [`Refused::Full`].
    pub(crate) queue_capacity: usize,
    /// Jobs sent in one batch at most.
    pub(crate) max_batch: usize,
}

type Queued<F> = (<F as Flush>::Job, oneshot::Sender<<F as Flush>::Out>);

/// The submitting side; the task stops when the last handle is dropped.
pub(crate) struct Batcher<F: Flush> {
    tx: mpsc::Sender<Queued<F>>,
    queued: metrics::Gauge,
    refused: metrics::Counter,
}

/// `switchboard_router_sequence_*`: the sequencing queue of this process.
const QUEUE_GAUGE: &str = "switchboard_router_sequence_queue_messages";
const REFUSED_COUNTER: &str = "switchboard_router_sequence_refused_total";
const BATCH_HISTOGRAM: &str = "switchboard_router_sequence_batch_size";

impl<F: Flush> Batcher<F> {
    /// Spawns the batching task (needs a tokio runtime).
    pub(crate) fn spawn(flush: F, limits: BatchLimits) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue_capacity.max(1));
        let queued = metrics::gauge!(QUEUE_GAUGE);
        tokio::spawn(run(rx, flush, limits.max_batch.max(1), queued.clone()));
        Batcher {
            tx,
            queued,
            refused: metrics::counter!(REFUSED_COUNTER),
        }
    }

    /// Queues `job` behind those already waiting and returns its answer.
    pub(crate) async fn submit(&self, job: F::Job) -> Result<F::Out, Refused> {
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send((job, reply)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.refused.increment(1);
                return Err(Refused::Full);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Refused::Stopped),
        }
        self.queued
            .set((self.tx.max_capacity() - self.tx.capacity()) as f64);
        answer.await.map_err(|_| Refused::Stopped)
    }
}

async fn run<F: Flush>(
    mut rx: mpsc::Receiver<Queued<F>>,
    mut flush: F,
    max_batch: usize,
    queued: metrics::Gauge,
) {
    let sizes = metrics::histogram!(BATCH_HISTOGRAM);
    let mut waiting = Vec::with_capacity(max_batch);
    // `recv_many` waits for the first job only, then takes what is already
    // queued: no timer, so a lone job is never held back.
    while rx.recv_many(&mut waiting, max_batch).await > 0 {
        queued.set(rx.len() as f64);
        sizes.record(waiting.len() as f64);
        let (jobs, replies): (Vec<_>, Vec<_>) = waiting.drain(..).unzip();
        let answers = flush.flush(jobs).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The submitter may have given up waiting; the job still ran.
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records each batch; job `n` answers `n * 10`, job 13 fails alone.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
    }

    impl Flush for Recorder {
        type Job = u32;
        type Out = Result<u32, ()>;
        async fn flush(&mut self, jobs: Vec<u32>) -> Vec<Result<u32, ()>> {
            self.batches.lock().unwrap().push(jobs.clone());
            tokio::task::yield_now().await;
            jobs.into_iter()
                .map(|n| if n == 13 { Err(()) } else { Ok(n * 10) })
                .collect()
        }
    }

    fn limits(queue_capacity: usize, max_batch: usize) -> BatchLimits {
        BatchLimits {
            queue_capacity,
            max_batch,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_job_goes_out_without_waiting_on_a_timer() {
        let rec = Recorder::default();
        let b = Batcher::spawn(rec.clone(), limits(8, 8));
        let before = tokio::time::Instant::now();
        assert_eq!(b.submit(4).await, Ok(Ok(40)));
        // With the clock paused, time moves only when every task waits on
        // a timer: an unchanged clock means no linger timer was awaited.
        assert_eq!(tokio::time::Instant::now(), before);
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec![4]]);
    }

    #[tokio::test]
    async fn waiting_jobs_go_as_one_batch_in_arrival_order() {
        let rec = Recorder::default();
        let b = Arc::new(Batcher::spawn(rec.clone(), limits(64, 4)));
        // Current-thread runtime: all ten are queued before the task runs.
        let handles: Vec<_> = (0..10)
            .map(|n| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(n).await })
            })
            .collect();
        let mut answers = Vec::new();
        for h in handles {
            answers.push(h.await.unwrap());
        }
        let expected: Vec<_> = (0..10).map(|n| Ok(Ok(n * 10))).collect();
        assert_eq!(answers, expected);
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );
    }

    #[tokio::test]
    async fn one_failing_job_leaves_its_batch_mates_alone() {
        let rec = Recorder::default();
        let b = Arc::new(Batcher::spawn(rec.clone(), limits(64, 64)));
        let handles: Vec<_> = [12, 13, 14]
            .into_iter()
            .map(|n| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(n).await })
            })
            .collect();
        let mut answers = Vec::new();
        for h in handles {
            answers.push(h.await.unwrap());
        }
        assert_eq!(answers, vec![Ok(Ok(120)), Ok(Err(())), Ok(Ok(140))]);
        assert_eq!(rec.batches.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_waiting() {
        let rec = Recorder::default();
        let b = Arc::new(Batcher::spawn(rec.clone(), limits(2, 64)));
        // Queue three before the task runs: the third finds the queue full.
        let handles: Vec<_> = (0..3)
            .map(|n| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(n).await })
            })
            .collect();
        let mut answers = Vec::new();
        for h in handles {
            answers.push(h.await.unwrap());
        }
        assert_eq!(answers, vec![Ok(Ok(0)), Ok(Ok(10)), Err(Refused::Full)]);
    }
}
