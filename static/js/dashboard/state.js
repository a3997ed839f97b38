// What the dashboard is about to explain. Each panel keeps its own details (predictions, the job,
// the shown result); only the choices several panels need live here.

export function createState() {
  return {
    models: [], // from GET /api/models, set once at start
    methods: [], // from GET /api/methods, set once at start
    model: null, // name
    image: null, // {id, url, width, height}
    target: null, // {index, label}
    method: null, // an entry of methods
    form: null, // the method's parameter form (form.js)
    busy: false, // an explanation is running
    /** Everything an explanation needs has been chosen. */
    ready() {
      return !!(this.image && this.model && this.target && this.method);
    },
  };
}
