//! Background tasks that belong to something mounted: aborted when it is unmounted, or
//! dropped, so a layer's prefetch never outlives the layer.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;

/// Tasks owned by one mounted layer.
#[derive(Debug, Default)]
pub struct Tasks {
    handles: Vec<AbortHandle>,
}

impl Tasks {
    /// Runs `task` on `runtime` until it ends or these tasks are cancelled.
    pub fn spawn(&mut self, runtime: &Handle, task: impl Future<Output = ()> + Send + 'static) {
        self.handles.retain(|handle| !handle.is_finished());
        self.handles.push(runtime.spawn(task).abort_handle());
    }

    /// Aborts every task still running; each stops at its next await.
    pub fn cancel(&mut self) {
        for handle in self.handles.drain(..) {
            handle.abort();
        }
    }

    /// Tasks spawned and not yet finished.
    pub fn running(&self) -> usize {
        self.handles.iter().filter(|h| !h.is_finished()).count()
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Sends on drop: tells the test the task's future is gone.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn cancelling_and_dropping_abort_a_task_that_would_run_forever() {
        for cancel in [true, false] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut tasks = Tasks::default();
            let guard = Dropped(Some(tx));
            tasks.spawn(&Handle::current(), async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
            assert_eq!(tasks.running(), 1);
            if cancel {
                tasks.cancel();
            } else {
                drop(tasks);
            }
            tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .expect("the task was aborted")
                .unwrap();
        }
    }
}
