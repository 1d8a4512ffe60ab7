/** A small typed event emitter that works the same in browsers and Node. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- listener tuples of any shape
export type EventMap = Record<string, (...args: any[]) => void>;

export class Emitter<Events extends EventMap> {
  private listeners = new Map<keyof Events, Set<Events[keyof Events]>>();

  /** Adds a listener; returns a function that removes it. */
  on<E extends keyof Events>(event: E, listener: Events[E]): () => void {
    let set = this.listeners.get(event);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener);
    return () => { this.off(event, listener); };
  }

  off<E extends keyof Events>(event: E, listener: Events[E]): void {
    this.listeners.get(event)?.delete(listener);
  }

  /** True when a listener ran. A throwing listener is reported, never breaks the client. */
  protected emit<E extends keyof Events>(event: E, ...args: Parameters<Events[E]>): boolean {
    const set = this.listeners.get(event);
    if (set === undefined || set.size === 0) return false;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (error) {
        // Surfaced like an uncaught error, without unwinding the client's state machine.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    return true;
  }
}
